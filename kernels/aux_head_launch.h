// Launchers of the fused auxiliary-head CUDA kernels (kernels/aux_head.cu). Plain structs of raw
// pointers and sizes only: no ATen and no CUDA headers, so the g++-compiled host half
// (csrc/aux_head/aux_head_cuda.cpp) can call them. The host has guarded every argument. A launcher
// never throws: it returns the CUDA error code of its launches (0 = success) and the host turns a
// non-zero code into an exception.
#pragma once
#include <cstddef>
#include <cstdint>

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace mlaan_fast::aux_head::launch {

using Stream = CUstream_st*;

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Threads per block of the per-sample kernels (forward, d(features)).
constexpr int kThreads = 256;

// Dynamic shared memory of the forward kernel: pooled [C], logits [N], partial sums [kThreads].
inline size_t forward_smem_bytes(int64_t C, int64_t N, size_t acc_size) {
  return static_cast<size_t>(C + N + kThreads) * acc_size;
}

// Accumulators, weight, bias and every output are acc_dtype (float32, or float64 with float64
// features). Out-of-range targets are not checked here: their losses are NaN.
struct Forward {
  const void* x;  // features [B, C, H, W] with the strides below, elements of x_dtype
  DType x_dtype;
  DType acc_dtype;
  int64_t stride_b, stride_c, stride_h, stride_w;
  int B, C, H, W, N;
  const void* weight;     // [N, C] contiguous
  const void* bias;       // [N] or nullptr
  const int64_t* target;  // [B]
  double label_smoothing;
  void* losses;  // [B]
  void* logits;  // [B, N]
  void* pooled;  // [B, C]
  void* lse;     // [B]
};
int forward(const Forward& a, Stream stream);

// d(features) [B, C, HW] (contiguous) or [B, HW, C] (channels_last) of out_dtype. Every acc_dtype
// input is contiguous; a sample whose target is outside [0, N) gets NaN gradients.
struct BackwardInput {
  DType acc_dtype;
  DType out_dtype;
  const void* grad_losses;  // [B], element stride grad_losses_stride (0: one value for all)
  int64_t grad_losses_stride;
  const void* grad_logits;  // [B, N] or nullptr
  const void* logits;       // [B, N]
  const void* lse;          // [B]
  const void* weight;       // [N, C]
  const int64_t* target;    // [B]
  int B, N, C, HW;
  double label_smoothing;
  bool channels_last;
  void* out;
};
int backward_input(const BackwardInput& a, Stream stream);

// Tile of the d(weight)/d(bias) kernel: kParamsLanes channel lanes x kParamsGroups batch groups
// per block, kParamsTileN classes per block.
constexpr int kParamsLanes = 32, kParamsGroups = 16, kParamsTileN = 4;
constexpr int kMaxSplits = 256;

// The batch cut into `splits` contiguous ranges of `per_split` samples (the last may be shorter).
struct BatchSplit {
  int splits;
  int per_split;
};

// Enough splits for about two blocks per multiprocessor, but at least kParamsGroups samples per
// split (one per batch group) and at most kMaxSplits. Depends only on (B, N, C, multiprocessors).
inline BatchSplit backward_params_split(int64_t B, int64_t N, int64_t C, int multiprocessors) {
  const int64_t tiles = ((N + kParamsTileN - 1) / kParamsTileN) * ((C + 1 + kParamsLanes - 1) / kParamsLanes);
  const int64_t wanted = (2 * static_cast<int64_t>(multiprocessors) + tiles - 1) / tiles;
  const int64_t most = (B + kParamsGroups - 1) / kParamsGroups;
  int64_t splits = wanted < most ? wanted : most;
  splits = splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits);
  const int64_t per_split = (B + splits - 1) / splits;
  // Recount so that no split is empty: ceil(B / per_split) <= splits.
  return {static_cast<int>((B + per_split - 1) / per_split), static_cast<int>(per_split)};
}

// (d(weight) [N, C], d(bias) [N]) = sum over the batch of dlogits[b, n] * (pooled[b, c], 1).
// Phase 1: block (class tile, channel tile, split) sums its split into workspace[split]
// [splits, N, C + 1] (column C is d(bias)); phase 2 adds the splits in order 0, 1, ... into the
// outputs. With one split phase 1 writes the outputs directly. No atomics: the result depends
// only on the inputs and the split. A sample whose target is outside [0, N) makes them NaN.
struct BackwardParams {
  DType acc_dtype;
  const void* grad_losses;  // [B], element stride grad_losses_stride (0: one value for all)
  int64_t grad_losses_stride;
  const void* grad_logits;  // [B, N] or nullptr
  const void* logits;       // [B, N]
  const void* lse;          // [B]
  const void* pooled;       // [B, C]
  const int64_t* target;    // [B]
  int B, N, C;
  double label_smoothing;
  BatchSplit split;
  void* workspace;    // [splits, N, C + 1] of acc_dtype when split.splits > 1, else unused
  void* grad_weight;  // [N, C]
  void* grad_bias;    // [N]
};
int backward_params(const BackwardParams& a, Stream stream);

}  // namespace mlaan_fast::aux_head::launch
