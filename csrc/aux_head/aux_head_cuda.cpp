// CUDA host half of the fused auxiliary-head loss: size limits of the kernels, the current
// stream and graph-capture state, and the calls to the launchers of kernels/aux_head.cu, whose
// error codes become exceptions here (g++-compiled code; nothing in the .cu throws).
#include "aux_head/aux_head.h"

#ifdef MLAAN_FAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "aux_head_launch.h"
#endif

namespace mlaan_fast::aux_head::cuda {

#ifdef MLAAN_FAST_WITH_CUDA

namespace {

constexpr const char* kOp = "aux_head_loss";
constexpr int64_t kIntLimit = int64_t(1) << 31;
constexpr size_t kSharedLimit = 48 * 1024;  // dynamic shared memory without an opt-in

launch::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return launch::DType::kFloat32;
    case at::kDouble: return launch::DType::kFloat64;
    case at::kHalf: return launch::DType::kFloat16;
    case at::kBFloat16: return launch::DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "aux_head_loss: the cuda backend has no kernel for ", t);
  }
  return launch::DType::kFloat32;
}

void check_launch(int err) { C10_CUDA_CHECK(static_cast<cudaError_t>(err)); }

launch::Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int multiprocessors(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace

bool stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

void check_forward_sizes(const Dims& d, at::ScalarType cdt) {
  TORCH_CHECK_VALUE(d.C * d.H * d.W < kIntLimit && d.N < kIntLimit && d.B < kIntLimit, kOp,
                    ": sizes too large for the cuda backend (C*H*W, N and B must be < 2^31)");
  const size_t smem = launch::forward_smem_bytes(d.C, d.N, c10::elementSize(cdt));
  TORCH_CHECK_VALUE(smem <= kSharedLimit, kOp, ": C + N = ", d.C + d.N, " is too large for the cuda backend ",
                    "(shared memory ", smem, " bytes > 48 KiB); use the triton or reference backend");
}

void check_backward_input_sizes(int64_t B, int64_t N, int64_t C, int64_t HW, at::ScalarType cdt) {
  TORCH_CHECK_VALUE(C * HW < kIntLimit && B < kIntLimit, kOp, ": C*H*W and B must be < 2^31 for the cuda backend");
  const size_t smem = static_cast<size_t>(N + C) * c10::elementSize(cdt);
  TORCH_CHECK_VALUE(smem <= kSharedLimit, kOp, ": C + N = ", C + N, " is too large for the cuda backend");
}

void check_backward_params_sizes(int64_t B, int64_t N, int64_t C) {
  TORCH_CHECK_VALUE(B * std::max(N, C + 1) < kIntLimit, kOp, ": sizes too large for the cuda backend");
  TORCH_CHECK_VALUE((C + launch::kParamsLanes) / launch::kParamsLanes <= 65535, kOp, ": C = ", C,
                    " is too large for the cuda backend");
}

void forward(const ForwardOperands& in, const ForwardOutputs& out) {
  const Dims& d = in.d;
  launch::Forward a{};
  a.x = in.x.const_data_ptr();
  a.x_dtype = dtype_of(in.x.scalar_type());
  a.acc_dtype = dtype_of(out.losses.scalar_type());
  a.stride_b = d.stride_b; a.stride_c = d.stride_c; a.stride_h = d.stride_h; a.stride_w = d.stride_w;
  a.B = static_cast<int>(d.B); a.C = static_cast<int>(d.C); a.H = static_cast<int>(d.H);
  a.W = static_cast<int>(d.W); a.N = static_cast<int>(d.N);
  a.weight = in.w.const_data_ptr();
  a.bias = in.bias.defined() ? in.bias.const_data_ptr() : nullptr;
  a.target = in.t.const_data_ptr<int64_t>();
  a.label_smoothing = in.label_smoothing;
  a.losses = out.losses.data_ptr(); a.logits = out.logits.data_ptr();
  a.pooled = out.pooled.data_ptr(); a.lse = out.lse.data_ptr();
  check_launch(launch::forward(a, current_stream()));
}

void backward_input(const BackwardOperands& in, const at::Tensor& w, const at::Tensor& out, bool channels_last) {
  launch::BackwardInput a{};
  a.acc_dtype = dtype_of(in.logits.scalar_type());
  a.out_dtype = dtype_of(out.scalar_type());
  a.grad_losses = in.grad_losses.const_data_ptr();
  a.grad_losses_stride = in.grad_losses_stride;
  a.grad_logits = in.grad_logits.defined() ? in.grad_logits.const_data_ptr() : nullptr;
  a.logits = in.logits.const_data_ptr(); a.lse = in.lse.const_data_ptr(); a.weight = w.const_data_ptr();
  a.target = in.t.const_data_ptr<int64_t>();
  a.B = static_cast<int>(in.B); a.N = static_cast<int>(in.N); a.C = static_cast<int>(w.size(1));
  a.HW = static_cast<int>(out.numel() / (in.B * w.size(1)));
  a.label_smoothing = in.label_smoothing;
  a.channels_last = channels_last;
  a.out = out.data_ptr();
  check_launch(launch::backward_input(a, current_stream()));
}

void backward_params(const BackwardOperands& in, const at::Tensor& pooled, const at::Tensor& gw, const at::Tensor& gb) {
  const int64_t C = pooled.size(1);
  launch::BackwardParams a{};
  a.acc_dtype = dtype_of(in.logits.scalar_type());
  a.grad_losses = in.grad_losses.const_data_ptr();
  a.grad_losses_stride = in.grad_losses_stride;
  a.grad_logits = in.grad_logits.defined() ? in.grad_logits.const_data_ptr() : nullptr;
  a.logits = in.logits.const_data_ptr(); a.lse = in.lse.const_data_ptr(); a.pooled = pooled.const_data_ptr();
  a.target = in.t.const_data_ptr<int64_t>();
  a.B = static_cast<int>(in.B); a.N = static_cast<int>(in.N); a.C = static_cast<int>(C);
  a.label_smoothing = in.label_smoothing;
  a.split = launch::backward_params_split(in.B, in.N, C, multiprocessors(pooled.get_device()));
  // Freed at scope exit; the caching allocator reuses it only after the kernels on this stream.
  const at::Tensor workspace =
      a.split.splits > 1 ? at::empty({a.split.splits, in.N, C + 1}, pooled.options()) : at::Tensor();
  a.workspace = workspace.defined() ? workspace.data_ptr() : nullptr;
  a.grad_weight = gw.data_ptr(); a.grad_bias = gb.data_ptr();
  check_launch(launch::backward_params(a, current_stream()));
}

#else  // built without CUDA: never reached, no CUDA kernel is registered

namespace {
void no_cuda() { TORCH_CHECK(false, "mlaan_fast._C was built without CUDA kernels"); }
}  // namespace

bool stream_is_capturing() { return false; }
void check_forward_sizes(const Dims&, at::ScalarType) { no_cuda(); }
void check_backward_input_sizes(int64_t, int64_t, int64_t, int64_t, at::ScalarType) { no_cuda(); }
void check_backward_params_sizes(int64_t, int64_t, int64_t) { no_cuda(); }
void forward(const ForwardOperands&, const ForwardOutputs&) { no_cuda(); }
void backward_input(const BackwardOperands&, const at::Tensor&, const at::Tensor&, bool) { no_cuda(); }
void backward_params(const BackwardOperands&, const at::Tensor&, const at::Tensor&, const at::Tensor&) { no_cuda(); }

#endif

}  // namespace mlaan_fast::aux_head::cuda
