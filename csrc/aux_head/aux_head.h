// Host side of the fused auxiliary-head loss (GAP -> Linear -> softmax cross-entropy): the operands
// handed to a kernel after the guards and conversion, the CPU kernels (aux_head_cpu.cpp) and the
// CUDA host half (aux_head_cuda.cpp). The kernel operators are in aux_head_ops.cpp (one host
// function per operator for every device), the composite aux_head_loss in aux_head_autograd.cpp.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace mlaan_fast::aux_head {

// Sizes of one call; 2-D features [B, C] are treated as [B, C, 1, 1].
struct Dims {
  int64_t B, C, H, W, N;
  int64_t stride_b, stride_c, stride_h, stride_w;
};

// Forward operands, guarded and converted: x is float64 when computing in float64 (else the
// features as they are), w [N,C] and bias [N] (undefined when absent) contiguous in the compute
// dtype, t contiguous; d describes x.
struct ForwardOperands {
  at::Tensor x, w, bias, t;
  Dims d;
  double label_smoothing;
};

struct ForwardOutputs {
  at::Tensor losses, logits, pooled, lse;  // [B], [B,N], [B,C], [B], contiguous, compute dtype
};

// Backward operands, guarded, all of the compute dtype but target (int64); contiguous but
// grad_losses, which is read with its own stride (0 for one value expanded over the batch, as a
// mean or sum reduction's gradient is). grad_logits is undefined when absent.
struct BackwardOperands {
  at::Tensor grad_losses, grad_logits, logits, lse, t;
  int64_t grad_losses_stride;
  int64_t B, N;
  double label_smoothing;
};

// CPU kernels (aux_head_cpu.cpp). A target outside [0, N) gives a NaN loss and NaN gradients.
void forward_cpu(const ForwardOperands& in, const ForwardOutputs& out);
// w [N,C] contiguous; out [B,C,H,W] or [B,C] (contiguous, or channels_last) of any floating dtype.
void backward_input_cpu(const BackwardOperands& in, const at::Tensor& w, const at::Tensor& out, bool channels_last);
// pooled [B,C] contiguous -> gw [N,C], gb [N].
void backward_params_cpu(const BackwardOperands& in, const at::Tensor& pooled, const at::Tensor& gw,
                         const at::Tensor& gb);

// CUDA host half (aux_head_cuda.cpp): size limits, stream, launch and error check. Without CUDA
// in the build these raise (they are never reached: no CUDA kernel is registered).
namespace cuda {
// True while the current CUDA stream is capturing a graph (no host sync allowed).
bool stream_is_capturing();
// Size limits of the CUDA kernels (shared memory, 32-bit indices): ValueError naming the backend.
void check_forward_sizes(const Dims& d, at::ScalarType cdt);
void check_backward_input_sizes(int64_t B, int64_t N, int64_t C, int64_t HW, at::ScalarType cdt);
void check_backward_params_sizes(int64_t B, int64_t N, int64_t C);
void forward(const ForwardOperands& in, const ForwardOutputs& out);
void backward_input(const BackwardOperands& in, const at::Tensor& w, const at::Tensor& out, bool channels_last);
void backward_params(const BackwardOperands& in, const at::Tensor& pooled, const at::Tensor& gw, const at::Tensor& gb);
}  // namespace cuda

}  // namespace mlaan_fast::aux_head
