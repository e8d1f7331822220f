// Fused auxiliary-head loss on CUDA: global-average-pool -> Linear -> softmax cross-entropy.
// Forward: one block per sample (pool into shared memory, logits, log-sum-exp, loss).
// Backward: one block per sample for d(features); for d(weight), d(bias) a tiled kernel over
// batch splits plus an in-order sum of the splits (deterministic, no atomics).
// Kernels and their launchers only: all checks, allocation and errors live in the g++-compiled
// host code (csrc/aux_head/aux_head_cuda.cpp); nothing here throws.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "aux_head_launch.h"

namespace mlaan_fast::aux_head::launch {
namespace {

constexpr int kWarps = kThreads / 32;

template <typename acc_t>
__device__ __forceinline__ acc_t nan_value() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum (or max) of one value per thread over the block; every thread gets the result.
template <typename acc_t, bool kMax>
__device__ acc_t block_reduce(acc_t v, acc_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    acc_t r = lane < kWarps ? scratch[lane] : (kMax ? -std::numeric_limits<acc_t>::infinity() : acc_t(0));
    r = kMax ? warp_max(r) : warp_sum(r);
    if (lane == 0) scratch[kWarps] = r;
  }
  __syncthreads();
  const acc_t out = scratch[kWarps];
  __syncthreads();
  return out;
}

template <typename acc_t>
__device__ __forceinline__ acc_t exp_(acc_t x) { return exp(x); }
template <>
__device__ __forceinline__ float exp_<float>(float x) { return expf(x); }

// g * (softmax_n - (1 - eps) [n == t] - eps / N), softmax_n = exp(z - lse).
template <typename acc_t>
__device__ __forceinline__ acc_t dlogit(acc_t g, acc_t z, acc_t lse, bool is_target, acc_t eps, acc_t inv_n) {
  return g * (exp_(z - lse) - (is_target ? acc_t(1) - eps : acc_t(0)) - eps * inv_n);
}

// d(loss_b) scale of sample b: NaN when its target is outside [0, N), so its gradients are NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t sample_grad(const acc_t* grad_losses, int64_t stride, int64_t t, int64_t b, int N) {
  return (t < 0 || t >= N) ? nan_value<acc_t>() : grad_losses[b * stride];
}

struct FeatureGeometry {
  int64_t stride_b, stride_c, stride_h, stride_w;
  int C, W, HW;
  bool channels_inner;  // stride_c is the smallest stride: threads run along channels
  bool hw_dense;        // stride_h == W * stride_w: position p sits at p * stride_w
};

__device__ __forceinline__ int64_t position_offset(const FeatureGeometry& geo, int p) {
  if (geo.hw_dense) return p * geo.stride_w;
  const int h = p / geo.W, w = p - h * geo.W;
  return h * geo.stride_h + w * geo.stride_w;
}

// One block per sample. Shared memory: pooled [C], logits [N], partial sums [kThreads].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) _aux_head_forward_kernel(
    const scalar_t* __restrict__ x, FeatureGeometry geo, const acc_t* __restrict__ weight,
    const acc_t* __restrict__ bias, const int64_t* __restrict__ target, int N, acc_t eps,
    acc_t* __restrict__ losses, acc_t* __restrict__ logits, acc_t* __restrict__ pooled,
    acc_t* __restrict__ lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* s_pool = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s_logit = s_pool + geo.C;
  acc_t* s_part = s_logit + N;
  __shared__ acc_t s_red[kWarps + 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x;
  const scalar_t* xb = x + b * geo.stride_b;
  const int C = geo.C, HW = geo.HW;
  const acc_t inv_hw = acc_t(1) / acc_t(HW);

  if (geo.channels_inner) {
    // Threads split into `groups` position groups of `lanes` channel lanes; partial sums per group
    // are added in group order.
    const int lanes = C >= kThreads ? kThreads : ((C + 31) / 32) * 32;
    const int groups = kThreads / lanes;
    const int lc = tid % lanes, grp = tid / lanes;
    for (int c = lc; c < C; c += lanes) {
      acc_t acc = acc_t(0);
      if (grp < groups) {
        for (int p = grp; p < HW; p += groups)
          acc += static_cast<acc_t>(xb[c * geo.stride_c + position_offset(geo, p)]);
        if (groups == 1) s_pool[c] = acc * inv_hw;
        else s_part[grp * lanes + c] = acc;
      }
    }
    if (groups > 1) {
      __syncthreads();
      for (int c = tid; c < C; c += kThreads) {
        acc_t acc = acc_t(0);
        for (int g = 0; g < groups; ++g) acc += s_part[g * lanes + c];
        s_pool[c] = acc * inv_hw;
      }
    }
  } else {
    // One warp per channel, lanes along the positions.
    for (int c = warp; c < C; c += kWarps) {
      acc_t acc = acc_t(0);
      for (int p = lane; p < HW; p += 32) acc += static_cast<acc_t>(xb[c * geo.stride_c + position_offset(geo, p)]);
      acc = warp_sum(acc);
      if (lane == 0) s_pool[c] = acc * inv_hw;
    }
  }
  __syncthreads();

  // logits[n] = bias[n] + weight[n, :] . pooled: one warp per class, lanes along channels.
  for (int n = warp; n < N; n += kWarps) {
    const acc_t* wn = weight + static_cast<int64_t>(n) * C;
    acc_t acc = acc_t(0);
    for (int c = lane; c < C; c += 32) acc += wn[c] * s_pool[c];
    acc = warp_sum(acc);
    if (lane == 0) s_logit[n] = acc + (bias != nullptr ? bias[n] : acc_t(0));
  }
  __syncthreads();

  acc_t zmax = -std::numeric_limits<acc_t>::infinity(), zsum = acc_t(0), nonfinite = acc_t(0);
  for (int n = tid; n < N; n += kThreads) {
    const acc_t z = s_logit[n];
    zmax = nan_max(zmax, z);
    zsum += z;
    nonfinite += (isfinite(z) ? acc_t(0) : acc_t(1));
  }
  zmax = block_reduce<acc_t, true>(zmax, s_red);
  zsum = block_reduce<acc_t, false>(zsum, s_red);
  nonfinite = block_reduce<acc_t, false>(nonfinite, s_red);
  acc_t se = acc_t(0);
  for (int n = tid; n < N; n += kThreads) se += exp_(s_logit[n] - zmax);
  se = block_reduce<acc_t, false>(se, s_red);

  for (int n = tid; n < N; n += kThreads) logits[b * N + n] = s_logit[n];
  for (int c = tid; c < C; c += kThreads) pooled[b * C + c] = s_pool[c];
  if (tid == 0) {
    // Non-finite logits (from non-finite features or weights) give a NaN loss, never a number.
    const acc_t m = nonfinite == acc_t(0) ? zmax + log(se) : nan_value<acc_t>();
    lse[b] = m;
    const int64_t t = target[b];
    // An unchecked out-of-range target (check_target=False, graph capture) gives a NaN loss.
    losses[b] = (t < 0 || t >= N) ? nan_value<acc_t>() : m - (acc_t(1) - eps) * s_logit[t] - eps * zsum / acc_t(N);
  }
}

// One block per sample: d(pooled) = dlogits . W / HW, broadcast over the positions.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) _aux_head_backward_input_kernel(
    const acc_t* __restrict__ grad_losses, int64_t grad_losses_stride, const acc_t* __restrict__ grad_logits,
    const acc_t* __restrict__ logits, const acc_t* __restrict__ lse, const acc_t* __restrict__ weight,
    const int64_t* __restrict__ target, int N, int C, int HW, acc_t eps, bool channels_last,
    scalar_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* s_dl = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s_dp = s_dl + N;
  const int64_t b = blockIdx.x;
  const int64_t t = target[b];
  const acc_t g = sample_grad(grad_losses, grad_losses_stride, t, b, N), m = lse[b], inv_n = acc_t(1) / acc_t(N);
  for (int n = threadIdx.x; n < N; n += kThreads) {
    acc_t d = dlogit(g, logits[b * N + n], m, n == t, eps, inv_n);
    if (grad_logits != nullptr) d += grad_logits[b * N + n];
    s_dl[n] = d;
  }
  __syncthreads();
  const acc_t inv_hw = acc_t(1) / acc_t(HW);
  for (int c = threadIdx.x; c < C; c += kThreads) {
    acc_t acc = acc_t(0);
    for (int n = 0; n < N; ++n) acc += s_dl[n] * weight[static_cast<int64_t>(n) * C + c];
    s_dp[c] = acc * inv_hw;
  }
  __syncthreads();
  const int total = C * HW;  // < 2^31, checked on the host
  scalar_t* ob = out + b * total;
  if (channels_last) {
    for (int i = threadIdx.x; i < total; i += kThreads) ob[i] = static_cast<scalar_t>(s_dp[i % C]);
  } else {
    for (int i = threadIdx.x; i < total; i += kThreads) ob[i] = static_cast<scalar_t>(s_dp[i / HW]);
  }
}

constexpr int kLanes = kParamsLanes, kGroups = kParamsGroups, kTileN = kParamsTileN;

// Phase 1 of d(weight), d(bias). Block (x: class tile, y: channel tile, z: batch split) of
// kLanes channel lanes x kGroups batch groups; group `grp` adds samples b_begin + grp,
// b_begin + grp + kGroups, ... of the split, then the groups are added in order. Channel index C
// is a virtual column of ones, so that column of the tile is d(bias). Writes workspace[split]
// [N, C + 1] when workspace is given, else (a single split) grad_weight and grad_bias.
template <typename acc_t>
__global__ void __launch_bounds__(kLanes* kGroups) _aux_head_backward_params_kernel(
    const acc_t* __restrict__ grad_losses, int64_t grad_losses_stride, const acc_t* __restrict__ grad_logits,
    const acc_t* __restrict__ logits, const acc_t* __restrict__ lse, const acc_t* __restrict__ pooled,
    const int64_t* __restrict__ target, int B, int N, int C, int per_split, acc_t eps,
    acc_t* __restrict__ workspace, acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias) {
  __shared__ acc_t s_part[kGroups][kTileN][kLanes];
  const int lane = threadIdx.x, grp = threadIdx.y;
  const int c = blockIdx.y * kLanes + lane;
  const int n0 = blockIdx.x * kTileN;
  const int split = blockIdx.z;
  const int b_begin = split * per_split;  // < B: the host never launches an empty split
  const int b_end = min(B, b_begin + per_split);
  const acc_t inv_n = acc_t(1) / acc_t(N);
  acc_t acc[kTileN];
#pragma unroll
  for (int k = 0; k < kTileN; ++k) acc[k] = acc_t(0);
  for (int b = b_begin + grp; b < b_end; b += kGroups) {
    const acc_t p = c < C ? pooled[static_cast<int64_t>(b) * C + c] : (c == C ? acc_t(1) : acc_t(0));
    const int64_t t = target[b];
    const acc_t g = sample_grad(grad_losses, grad_losses_stride, t, b, N), m = lse[b];
#pragma unroll
    for (int k = 0; k < kTileN; ++k) {
      const int n = n0 + k;
      if (n < N) {
        const int64_t i = static_cast<int64_t>(b) * N + n;
        acc_t d = dlogit(g, logits[i], m, n == t, eps, inv_n);
        if (grad_logits != nullptr) d += grad_logits[i];
        acc[k] += d * p;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kTileN; ++k) s_part[grp][k][lane] = acc[k];
  __syncthreads();
  if (grp < kTileN) {
    const int k = grp, n = n0 + k;
    acc_t s = acc_t(0);
    for (int q = 0; q < kGroups; ++q) s += s_part[q][k][lane];
    if (n < N && c <= C) {
      if (workspace != nullptr) workspace[(static_cast<int64_t>(split) * N + n) * (C + 1) + c] = s;
      else if (c < C) grad_weight[static_cast<int64_t>(n) * C + c] = s;
      else grad_bias[n] = s;
    }
  }
}

// Phase 2: element i of [N, C + 1] is the sum of workspace[0][i], workspace[1][i], ... in order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) _aux_head_backward_params_sum_kernel(
    const acc_t* __restrict__ workspace, int splits, int N, int C, acc_t* __restrict__ grad_weight,
    acc_t* __restrict__ grad_bias) {
  const int64_t per_split = static_cast<int64_t>(N) * (C + 1);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < per_split; i += step) {
    acc_t s = acc_t(0);
    for (int k = 0; k < splits; ++k) s += workspace[k * per_split + i];
    const int64_t n = i / (C + 1), c = i - n * (C + 1);
    if (c < C) grad_weight[n * C + c] = s;
    else grad_bias[n] = s;
  }
}

// --- launchers ----------------------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<float>) or f(Tag<double>) for an accumulator dtype; an invalid value otherwise.
template <typename F>
int with_acc(DType dt, F&& f) {
  if (dt == DType::kFloat32) return f(Tag<float>{});
  if (dt == DType::kFloat64) return f(Tag<double>{});
  return cudaErrorInvalidValue;
}

// Calls f(Tag<T>) for a storage dtype (float, double, half, bfloat16).
template <typename F>
int with_storage(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
    case DType::kFloat16: return f(Tag<c10::Half>{});
    case DType::kBFloat16: return f(Tag<c10::BFloat16>{});
  }
  return cudaErrorInvalidValue;
}

FeatureGeometry geometry(const Forward& a) {
  FeatureGeometry geo{a.stride_b, a.stride_c, a.stride_h, a.stride_w, a.C, a.W, a.H * a.W, false,
                      a.stride_h == a.W * a.stride_w || a.H == 1};
  int64_t min_spatial = std::numeric_limits<int64_t>::max();
  if (a.H > 1) min_spatial = a.stride_h < min_spatial ? a.stride_h : min_spatial;
  if (a.W > 1) min_spatial = a.stride_w < min_spatial ? a.stride_w : min_spatial;
  geo.channels_inner = a.stride_c <= min_spatial;
  return geo;
}

template <typename scalar_t, typename acc_t>
int forward_typed(const Forward& a, Stream stream) {
  const size_t smem = forward_smem_bytes(a.C, a.N, sizeof(acc_t));
  _aux_head_forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(a.B), kThreads, smem, stream>>>(
      static_cast<const scalar_t*>(a.x), geometry(a), static_cast<const acc_t*>(a.weight),
      static_cast<const acc_t*>(a.bias), a.target, a.N, static_cast<acc_t>(a.label_smoothing),
      static_cast<acc_t*>(a.losses), static_cast<acc_t*>(a.logits), static_cast<acc_t*>(a.pooled),
      static_cast<acc_t*>(a.lse));
  return cudaGetLastError();
}

}  // namespace

// Features are read as stored and accumulated in float32, or float64 when both are float64.
int forward(const Forward& a, Stream stream) {
  if (a.acc_dtype == DType::kFloat64 && a.x_dtype == DType::kFloat64) return forward_typed<double, double>(a, stream);
  if (a.acc_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  switch (a.x_dtype) {
    case DType::kFloat32: return forward_typed<float, float>(a, stream);
    case DType::kFloat16: return forward_typed<c10::Half, float>(a, stream);
    case DType::kBFloat16: return forward_typed<c10::BFloat16, float>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

int backward_input(const BackwardInput& a, Stream stream) {
  return with_acc(a.acc_dtype, [&](auto acc_tag) {
    using acc_t = typename decltype(acc_tag)::type;
    return with_storage(a.out_dtype, [&](auto out_tag) {
      using scalar_t = typename decltype(out_tag)::type;
      const size_t smem = static_cast<size_t>(a.N + a.C) * sizeof(acc_t);
      _aux_head_backward_input_kernel<scalar_t, acc_t><<<static_cast<unsigned>(a.B), kThreads, smem, stream>>>(
          static_cast<const acc_t*>(a.grad_losses), a.grad_losses_stride, static_cast<const acc_t*>(a.grad_logits),
          static_cast<const acc_t*>(a.logits), static_cast<const acc_t*>(a.lse), static_cast<const acc_t*>(a.weight),
          a.target, a.N, a.C, a.HW, static_cast<acc_t>(a.label_smoothing), a.channels_last,
          static_cast<scalar_t*>(a.out));
      return static_cast<int>(cudaGetLastError());
    });
  });
}

int backward_params(const BackwardParams& a, Stream stream) {
  return with_acc(a.acc_dtype, [&](auto acc_tag) {
    using acc_t = typename decltype(acc_tag)::type;
    const int splits = a.split.splits;
    acc_t* workspace = splits > 1 ? static_cast<acc_t*>(a.workspace) : nullptr;
    const unsigned tiles_n = (a.N + kTileN - 1) / kTileN, tiles_c = (a.C + 1 + kLanes - 1) / kLanes;
    const dim3 grid(tiles_n, tiles_c, static_cast<unsigned>(splits));
    _aux_head_backward_params_kernel<acc_t><<<grid, dim3(kLanes, kGroups), 0, stream>>>(
        static_cast<const acc_t*>(a.grad_losses), a.grad_losses_stride, static_cast<const acc_t*>(a.grad_logits),
        static_cast<const acc_t*>(a.logits), static_cast<const acc_t*>(a.lse), static_cast<const acc_t*>(a.pooled),
        a.target, a.B, a.N, a.C, a.split.per_split, static_cast<acc_t>(a.label_smoothing), workspace,
        static_cast<acc_t*>(a.grad_weight), static_cast<acc_t*>(a.grad_bias));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || workspace == nullptr) return static_cast<int>(err);
    const int64_t elements = static_cast<int64_t>(a.N) * (a.C + 1);
    // The kernel strides over the elements beyond 4096 blocks.
    const auto blocks = static_cast<unsigned>(std::min<int64_t>((elements + kThreads - 1) / kThreads, 4096));
    _aux_head_backward_params_sum_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        workspace, splits, a.N, a.C, static_cast<acc_t*>(a.grad_weight), static_cast<acc_t*>(a.grad_bias));
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace mlaan_fast::aux_head::launch
