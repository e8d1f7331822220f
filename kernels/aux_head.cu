// Fused auxiliary-head loss on CUDA: global-average-pool -> Linear -> softmax cross-entropy.
// Forward: one block per sample (pool into shared memory, logits, log-sum-exp, loss).
// Backward: one block per sample for d(features); a tiled kernel for d(weight), d(bias) in which
// every output element is summed over the batch in a fixed order (deterministic, no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "aux_head.h"
#include "checks.h"

namespace mlaan_fast::aux_head {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

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
    acc_t* __restrict__ lse, int* __restrict__ bad_target) {
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
    const acc_t m = nonfinite == acc_t(0) ? zmax + log(se) : std::numeric_limits<acc_t>::quiet_NaN();
    lse[b] = m;
    const int64_t t = target[b];
    if (t < 0 || t >= N) {
      atomicMax(bad_target, static_cast<int>(b));  // only the largest bad index is kept: order-free
      losses[b] = std::numeric_limits<acc_t>::quiet_NaN();
    } else {
      losses[b] = m - (acc_t(1) - eps) * s_logit[t] - eps * zsum / acc_t(N);
    }
  }
}

// One block per sample: d(pooled) = dlogits . W / HW, broadcast over the positions.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) _aux_head_backward_input_kernel(
    const acc_t* __restrict__ grad_losses, const acc_t* __restrict__ grad_logits,
    const acc_t* __restrict__ logits, const acc_t* __restrict__ lse, const acc_t* __restrict__ weight,
    const int64_t* __restrict__ target, int N, int C, int HW, acc_t eps, bool channels_last,
    scalar_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* s_dl = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s_dp = s_dl + N;
  const int64_t b = blockIdx.x;
  const acc_t g = grad_losses[b], m = lse[b], inv_n = acc_t(1) / acc_t(N);
  const int64_t t = target[b];
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

// Block: kLanes channel lanes x kGroups batch groups, tile of kTileN classes x kLanes channels.
// Channel index C is a virtual column of ones, so that column of the tile is d(bias).
constexpr int kLanes = 32, kGroups = 16, kTileN = 4;

template <typename acc_t>
__global__ void __launch_bounds__(kLanes* kGroups) _aux_head_backward_params_kernel(
    const acc_t* __restrict__ grad_losses, const acc_t* __restrict__ grad_logits,
    const acc_t* __restrict__ logits, const acc_t* __restrict__ lse, const acc_t* __restrict__ pooled,
    const int64_t* __restrict__ target, int B, int N, int C, acc_t eps, acc_t* __restrict__ grad_weight,
    acc_t* __restrict__ grad_bias) {
  __shared__ acc_t s_part[kGroups][kTileN][kLanes];
  const int lane = threadIdx.x, grp = threadIdx.y;
  const int c = blockIdx.y * kLanes + lane;
  const int n0 = blockIdx.x * kTileN;
  const acc_t inv_n = acc_t(1) / acc_t(N);
  acc_t acc[kTileN];
#pragma unroll
  for (int k = 0; k < kTileN; ++k) acc[k] = acc_t(0);
  for (int b = grp; b < B; b += kGroups) {
    const acc_t p = c < C ? pooled[static_cast<int64_t>(b) * C + c] : (c == C ? acc_t(1) : acc_t(0));
    const acc_t g = grad_losses[b], m = lse[b];
    const int64_t t = target[b];
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
    if (n < N) {
      if (c < C) grad_weight[static_cast<int64_t>(n) * C + c] = s;
      else if (c == C && grad_bias != nullptr) grad_bias[n] = s;
    }
  }
}

size_t forward_smem_bytes(int64_t C, int64_t N, size_t acc_size) {
  return static_cast<size_t>(C + N + kThreads) * acc_size;
}

void launch_forward(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& target, double label_smoothing, at::Tensor& losses, at::Tensor& logits,
                    at::Tensor& pooled, at::Tensor& lse) {
  const char* op = "aux_head_loss_forward";
  const c10::cuda::CUDAGuard guard(features.device());
  const auto cdt = losses.scalar_type();
  const at::Tensor x = (cdt == at::kDouble && features.scalar_type() != at::kDouble) ? features.to(at::kDouble) : features;
  const Dims d = check_forward_inputs(op, x, weight, bias, target, label_smoothing);
  MLAAN_CHECK_VALUE(d.C * d.H * d.W < (int64_t(1) << 31) && d.N < (int64_t(1) << 31) && d.B < (int64_t(1) << 31), op,
                    ": sizes too large for the cuda backend (C*H*W, N and B must be < 2^31)");
  const size_t smem = forward_smem_bytes(d.C, d.N, cdt == at::kDouble ? 8 : 4);
  MLAAN_CHECK_VALUE(smem <= 48 * 1024, op, ": C + N = ", d.C + d.N, " is too large for the cuda backend ",
                    "(shared memory ", smem, " bytes > 48 KiB); use the triton or reference backend");
  const at::Tensor w = weight.to(cdt).contiguous();
  const at::Tensor bvec = bias.has_value() ? bias->to(cdt).contiguous() : at::Tensor();
  const at::Tensor t = target.contiguous();
  at::Tensor bad = at::full({1}, -1, target.options().dtype(at::kInt));
  FeatureGeometry geo{d.stride_b, d.stride_c, d.stride_h, d.stride_w, static_cast<int>(d.C), static_cast<int>(d.W),
                      static_cast<int>(d.H * d.W), false, d.stride_h == d.W * d.stride_w || d.H == 1};
  int64_t min_spatial = std::numeric_limits<int64_t>::max();
  if (d.H > 1) min_spatial = std::min(min_spatial, d.stride_h);
  if (d.W > 1) min_spatial = std::min(min_spatial, d.stride_w);
  geo.channels_inner = d.stride_c <= min_spatial;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aux_head_loss_forward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    _aux_head_forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(d.B), kThreads, smem, stream>>>(
        x.const_data_ptr<scalar_t>(), geo, w.const_data_ptr<acc_t>(),
        bias.has_value() ? bvec.const_data_ptr<acc_t>() : nullptr, t.const_data_ptr<int64_t>(),
        static_cast<int>(d.N), static_cast<acc_t>(label_smoothing), losses.data_ptr<acc_t>(), logits.data_ptr<acc_t>(),
        pooled.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The range check is on the device; this read waits for the kernel, before any result is used.
  const int bad_index = bad.item<int>();
  if (bad_index >= 0) check_target_range_cpu(op, t.cpu(), d.N);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& features, const at::Tensor& weight,
                                                                        const std::optional<at::Tensor>& bias,
                                                                        const at::Tensor& target, double label_smoothing) {
  const Dims d = check_forward_inputs("aux_head_loss_forward", features, weight, bias, target, label_smoothing);
  const auto opts = features.options().dtype(compute_dtype(features, weight));
  at::Tensor losses = at::empty({d.B}, opts), logits = at::empty({d.B, d.N}, opts);
  at::Tensor pooled = at::empty({d.B, d.C}, opts), lse = at::empty({d.B}, opts);
  launch_forward(features, weight, bias, target, label_smoothing, losses, logits, pooled, lse);
  return {losses, logits, pooled, lse};
}

void forward_out_cuda(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& target, double label_smoothing, at::Tensor losses, at::Tensor logits,
                      at::Tensor pooled, at::Tensor lse) {
  const char* op = "aux_head_loss_forward_out";
  const Dims d = check_forward_inputs(op, features, weight, bias, target, label_smoothing);
  const auto cdt = compute_dtype(features, weight);
  const std::pair<const char*, const at::Tensor*> outs[] = {{"losses", &losses}, {"logits", &logits}, {"pooled", &pooled}, {"lse", &lse}};
  const int64_t widths[] = {0, d.N, d.C, 0};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& o = *outs[i].second;
    const bool shape_ok = widths[i] == 0 ? (o.dim() == 1 && o.size(0) == d.B)
                                         : (o.dim() == 2 && o.size(0) == d.B && o.size(1) == widths[i]);
    MLAAN_CHECK_VALUE(shape_ok, op, ": ", outs[i].first, " has the wrong shape ", o.sizes());
    MLAAN_CHECK_TYPE(o.scalar_type() == cdt, op, ": ", outs[i].first, " must be ", cdt, ", got ", o.scalar_type());
    MLAAN_CHECK_VALUE(o.is_contiguous() && o.device() == features.device(), op, ": ", outs[i].first,
                      " must be contiguous and on ", features.device());
  }
  launch_forward(features, weight, bias, target, label_smoothing, losses, logits, pooled, lse);
}

at::Tensor backward_input_cuda(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_logits,
                               const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& weight,
                               const at::Tensor& target, double label_smoothing, at::IntArrayRef features_shape,
                               at::ScalarType features_dtype, bool channels_last) {
  const char* op = "aux_head_loss_backward_input";
  const auto [B, N] = check_backward_inputs(op, grad_losses, grad_logits, logits, lse, target, label_smoothing);
  MLAAN_CHECK_VALUE(features_shape.size() == 2 || features_shape.size() == 4, op,
                    ": features_shape must have 2 or 4 entries, got ", features_shape);
  MLAAN_CHECK_VALUE(features_shape[0] == B, op, ": features_shape[0] = ", features_shape[0], " but B = ", B);
  MLAAN_CHECK_VALUE(!channels_last || features_shape.size() == 4, op, ": channels_last needs 4-D features");
  MLAAN_CHECK_TYPE(at::isFloatingType(features_dtype), op, ": features_dtype must be floating point");
  const int64_t C = features_shape[1];
  const int64_t HW = features_shape.size() == 4 ? features_shape[2] * features_shape[3] : 1;
  MLAAN_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == C, op, ": weight must be [", N,
                    ", ", C, "], got shape ", weight.sizes());
  MLAAN_CHECK_VALUE(weight.device() == logits.device(), op, ": weight is on ", weight.device(),
                    " but logits are on ", logits.device());
  MLAAN_CHECK_VALUE(C * HW < (int64_t(1) << 31), op, ": C*H*W too large for the cuda backend");
  const auto cdt = logits.scalar_type();
  const size_t smem = static_cast<size_t>(N + C) * (cdt == at::kDouble ? 8 : 4);
  MLAAN_CHECK_VALUE(smem <= 48 * 1024, op, ": C + N = ", C + N, " is too large for the cuda backend");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty(features_shape, logits.options().dtype(features_dtype).memory_format(
                                                 channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  const at::Tensor w = weight.to(cdt).contiguous();
  const at::Tensor z = logits.contiguous(), g = grad_losses.contiguous(), m = lse.contiguous(), t = target.contiguous();
  const at::Tensor gl = grad_logits.has_value() ? grad_logits->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(cdt, "aux_head_loss_backward_input_cuda", [&] {
    using acc_t = scalar_t;
    const acc_t* glp = grad_logits.has_value() ? gl.const_data_ptr<acc_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features_dtype, "aux_head_loss_backward_input_store", [&] {
      _aux_head_backward_input_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
          g.const_data_ptr<acc_t>(), glp, z.const_data_ptr<acc_t>(), m.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
          t.const_data_ptr<int64_t>(), static_cast<int>(N), static_cast<int>(C), static_cast<int>(HW),
          static_cast<acc_t>(label_smoothing), channels_last, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_params_cuda(const at::Tensor& grad_losses,
                                                        const std::optional<at::Tensor>& grad_logits,
                                                        const at::Tensor& logits, const at::Tensor& lse,
                                                        const at::Tensor& pooled, const at::Tensor& target,
                                                        double label_smoothing) {
  const char* op = "aux_head_loss_backward_params";
  const auto [B, N] = check_backward_params_inputs(op, grad_losses, grad_logits, logits, lse, pooled, target,
                                                   label_smoothing);
  const int64_t C = pooled.size(1);
  MLAAN_CHECK_VALUE(B * std::max(N, C + 1) < (int64_t(1) << 31), op, ": sizes too large for the cuda backend");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor gw = at::empty({N, C}, logits.options()), gb = at::empty({N}, logits.options());
  const at::Tensor z = logits.contiguous(), g = grad_losses.contiguous(), m = lse.contiguous(), t = target.contiguous();
  const at::Tensor p = pooled.contiguous();
  const at::Tensor gl = grad_logits.has_value() ? grad_logits->contiguous() : at::Tensor();
  const dim3 grid(static_cast<unsigned>((N + kTileN - 1) / kTileN), static_cast<unsigned>((C + 1 + kLanes - 1) / kLanes));
  const dim3 block(kLanes, kGroups);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "aux_head_loss_backward_params_cuda", [&] {
    _aux_head_backward_params_kernel<scalar_t><<<grid, block, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), grad_logits.has_value() ? gl.const_data_ptr<scalar_t>() : nullptr,
        z.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(),
        t.const_data_ptr<int64_t>(), static_cast<int>(B), static_cast<int>(N), static_cast<int>(C),
        static_cast<scalar_t>(label_smoothing), gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gw, gb};
}

}  // namespace
}  // namespace mlaan_fast::aux_head

TORCH_LIBRARY_IMPL(mlaan_fast, CUDA, m) {
  m.impl("aux_head_loss_forward", &mlaan_fast::aux_head::forward_cuda);
  m.impl("aux_head_loss_forward_out", &mlaan_fast::aux_head::forward_out_cuda);
  m.impl("aux_head_loss_backward_input", &mlaan_fast::aux_head::backward_input_cuda);
  m.impl("aux_head_loss_backward_params", &mlaan_fast::aux_head::backward_params_cuda);
}
