// Fused auxiliary-head loss on CPU: global-average-pool -> Linear -> softmax cross-entropy.
// Forward reads each sample's features once (parallel over the batch) and keeps the logits, the
// pooled vector and the log-sum-exp; backward rebuilds d(logits) from them. Kernels only: the
// operators in aux_head_ops.cpp guard and convert the operands first.
//
// The linear layer runs as per-sample dot products for small batches and heads, and as the
// [B,C] x [C,N] products of ATen's GEMM for large ones (use_gemm): at the ImageNet head
// (N = 1000) the per-sample products had made the op 6-14x slower than eager PyTorch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "aux_head/aux_head.h"

namespace mlaan_fast::aux_head {

namespace {

// Sum of n contiguous values in acc_t. Eight running partial sums, added in a fixed order at the
// end: one chain of dependent adds would run at the add latency, and the compiler turns the
// eight independent ones into vector adds (an `omp simd` reduction here stayed scalar).
template <typename scalar_t, typename acc_t>
acc_t sum_dense(const scalar_t* p, int64_t n) {
  constexpr int64_t kParts = 8;
  acc_t part[kParts] = {};
  int64_t i = 0;
  for (; i + kParts <= n; i += kParts) {
    for (int64_t k = 0; k < kParts; ++k) part[k] += static_cast<acc_t>(p[i + k]);
  }
  acc_t s = acc_t(0);
  for (; i < n; ++i) s += static_cast<acc_t>(p[i]);
  for (int64_t k = 0; k < kParts; ++k) s += part[k];
  return s;
}

// Sum over the H*W positions of one sample into acc[C] (zeroed here), for any strides.
template <typename scalar_t, typename acc_t>
void pool_sample(const scalar_t* x, const Dims& d, acc_t* acc) {
  for (int64_t c = 0; c < d.C; ++c) acc[c] = acc_t(0);
  const bool channels_inner = (d.H * d.W == 1) || (d.stride_c <= d.stride_w && d.stride_c <= d.stride_h);
  if (channels_inner) {
    for (int64_t h = 0; h < d.H; ++h) {
      for (int64_t w = 0; w < d.W; ++w) {
        const scalar_t* row = x + h * d.stride_h + w * d.stride_w;
        if (d.stride_c == 1) {
#pragma omp simd
          for (int64_t c = 0; c < d.C; ++c) acc[c] += static_cast<acc_t>(row[c]);
        } else {
          for (int64_t c = 0; c < d.C; ++c) acc[c] += static_cast<acc_t>(row[c * d.stride_c]);
        }
      }
    }
    return;
  }
  const bool dense_plane = d.stride_w == 1 && d.stride_h == d.W;
  for (int64_t c = 0; c < d.C; ++c) {
    const scalar_t* plane = x + c * d.stride_c;
    if (dense_plane) {
      acc[c] = sum_dense<scalar_t, acc_t>(plane, d.H * d.W);
      continue;
    }
    acc_t s = acc_t(0);
    for (int64_t h = 0; h < d.H; ++h)
      for (int64_t w = 0; w < d.W; ++w) s += static_cast<acc_t>(plane[h * d.stride_h + w * d.stride_w]);
    acc[c] = s;
  }
}

// y[i] += s * x[i]
template <typename acc_t>
void axpy(acc_t s, const acc_t* x, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += s * x[i];
}

// a . b with eight partial sums, as sum_dense.
template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  constexpr int64_t kParts = 8;
  acc_t part[kParts] = {};
  int64_t i = 0;
  for (; i + kParts <= n; i += kParts) {
    for (int64_t k = 0; k < kParts; ++k) part[k] += a[i + k] * b[i + k];
  }
  acc_t s = acc_t(0);
  for (; i < n; ++i) s += a[i] * b[i];
  for (int64_t k = 0; k < kParts; ++k) s += part[k];
  return s;
}

// d loss_b / d z_n scaled by g, from the softmax p_n: g * (p_n - (1 - eps) [n == t] - eps / N).
template <typename acc_t>
inline acc_t dlogit_p(acc_t g, acc_t p, bool is_target, acc_t eps, acc_t inv_n) {
  return g * (p - (is_target ? acc_t(1) - eps : acc_t(0)) - eps * inv_n);
}

// The same from the logit z_n and the log-sum-exp: p_n = exp(z_n - lse).
template <typename acc_t>
inline acc_t dlogit(acc_t g, acc_t z, acc_t lse, bool is_target, acc_t eps, acc_t inv_n) {
  return dlogit_p(g, std::exp(z - lse), is_target, eps, inv_n);
}

// Scale of sample b's gradients: NaN when its target is outside [0, N) (an unchecked target).
template <typename acc_t>
inline acc_t sample_grad(const acc_t* grad_losses, int64_t stride, int64_t t, int64_t b, int64_t N) {
  return (t < 0 || t >= N) ? std::numeric_limits<acc_t>::quiet_NaN() : grad_losses[b * stride];
}

// When the linear layer runs as GEMM: a head of at least kGemmMinHead = N * C weights and at
// least kGemmMinWork = B * N * C multiply-adds. Measured fwd+bwd on a 2-core x86 machine: below
// the work bound the GEMM calls' fixed cost (about 25 us in all) dominates (B = 2..64: the
// per-sample path took 0.55-0.8x the time); the CIFAR heads (N = 10, C <= 64) were as fast or
// faster per sample at B = 128 and 256 (GEMM 1.0-1.3x slower); from N * C = 5120 at B = 256 on,
// GEMM took 0.2-0.96x the time of the per-sample path.
constexpr int64_t kGemmMinHead = 1 << 12, kGemmMinWork = 1 << 17;

bool use_gemm(int64_t B, int64_t N, int64_t C) { return N * C >= kGemmMinHead && B * N * C >= kGemmMinWork; }

// Samples per parallel_for task: about 32K feature elements of work each.
int64_t batch_grain(int64_t per_sample) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_sample)); }

// Log-sum-exp and loss of one sample from its logits zb[N]: (lse, loss), each NaN when a logit is
// not finite (non-finite features or weights) and the loss NaN for a target outside [0, N). The
// log-sum-exp is computed here unless given (lse_given).
template <typename acc_t>
std::pair<acc_t, acc_t> sample_loss(const acc_t* zb, int64_t N, int64_t t, acc_t eps, const acc_t* lse_given) {
  acc_t zmax = -std::numeric_limits<acc_t>::infinity();
  acc_t zsum = acc_t(0);
  bool finite = true;
  for (int64_t n = 0; n < N; ++n) {
    const acc_t z = zb[n];
    finite &= std::isfinite(z);
    zmax = std::max(zmax, z);
    zsum += z;
  }
  acc_t m;
  if (lse_given != nullptr) {
    m = *lse_given;
  } else {
    acc_t se = acc_t(0);
    for (int64_t n = 0; n < N; ++n) se += std::exp(zb[n] - zmax);
    m = zmax + std::log(se);
  }
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  m = finite ? m : nan;
  const acc_t loss = (t < 0 || t >= N) ? nan : m - (acc_t(1) - eps) * zb[t] - eps * zsum / static_cast<acc_t>(N);
  return {m, loss};
}

// Row b of d(logits) into row[N]: dlogit plus grad_logits when given. The softmax is taken from
// p[N] when given (p may be row itself), else computed from the logits and the log-sum-exp.
template <typename acc_t>
void dlogits_row(const BackwardOperands& in, int64_t b, const acc_t* p, acc_t* row) {
  const int64_t N = in.N, t = in.t.const_data_ptr<int64_t>()[b];
  const acc_t* zb = in.logits.const_data_ptr<acc_t>() + b * N;
  const acc_t m = in.lse.const_data_ptr<acc_t>()[b];
  const acc_t* glb = in.grad_logits.defined() ? in.grad_logits.const_data_ptr<acc_t>() + b * N : nullptr;
  const acc_t g = sample_grad(in.grad_losses.const_data_ptr<acc_t>(), in.grad_losses_stride, t, b, N);
  const acc_t eps = static_cast<acc_t>(in.label_smoothing), inv_n = acc_t(1) / static_cast<acc_t>(N);
  for (int64_t n = 0; n < N; ++n) {
    const acc_t pn = p ? p[n] : std::exp(zb[n] - m);
    row[n] = dlogit_p(g, pn, n == t, eps, inv_n) + (glb ? glb[n] : acc_t(0));
  }
}

// d(logits) [B, N] of the whole batch, in the logits dtype. The softmax comes from the saved
// log-sum-exp through ATen's vectorised exp: one scalar exp per logit was a tenth of the op's time
// at N = 1000.
at::Tensor dlogits(const BackwardOperands& in) {
  at::Tensor dl = in.logits - in.lse.unsqueeze(1);
  dl.exp_();
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "aux_head_loss_dlogits_cpu", [&] {
    scalar_t* dlp = dl.data_ptr<scalar_t>();
    at::parallel_for(0, in.B, batch_grain(in.N), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) dlogits_row<scalar_t>(in, b, dlp + b * in.N, dlp + b * in.N);
    });
  });
  return dl;
}

// Writes d(pooled) scaled by inv_hw over the HW positions of one sample, in NCHW or channels_last.
template <typename scalar_t, typename acc_t>
void broadcast_sample(const acc_t* dp, acc_t inv_hw, int64_t C, int64_t HW, bool channels_last, scalar_t* ob) {
  if (channels_last || HW == 1) {
    for (int64_t c = 0; c < C; ++c) ob[c] = static_cast<scalar_t>(dp[c] * inv_hw);
    for (int64_t p = 1; p < HW; ++p) std::copy(ob, ob + C, ob + p * C);
    return;
  }
  for (int64_t c = 0; c < C; ++c) std::fill(ob + c * HW, ob + (c + 1) * HW, static_cast<scalar_t>(dp[c] * inv_hw));
}

}  // namespace

void forward_cpu(const ForwardOperands& in, const ForwardOutputs& out) {
  const Dims& d = in.d;
  const int64_t C = d.C, N = d.N;
  const bool gemm = use_gemm(d.B, N, C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "aux_head_loss_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
    const acc_t* wp = in.w.const_data_ptr<acc_t>();
    const acc_t* bp = in.bias.defined() ? in.bias.const_data_ptr<acc_t>() : nullptr;
    const int64_t* tp = in.t.const_data_ptr<int64_t>();
    acc_t* loss_p = out.losses.data_ptr<acc_t>();
    acc_t* logit_p = out.logits.data_ptr<acc_t>();
    acc_t* pool_p = out.pooled.data_ptr<acc_t>();
    acc_t* lse_p = out.lse.data_ptr<acc_t>();
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(d.H * d.W);
    const acc_t eps = static_cast<acc_t>(in.label_smoothing);
    auto pool = [&](int64_t b) {
      acc_t* pb = pool_p + b * C;
      pool_sample<scalar_t, acc_t>(xp + b * d.stride_b, d, pb);
      for (int64_t c = 0; c < C; ++c) pb[c] *= inv_hw;
    };
    // lse_given: the log-sum-exp computed beforehand (GEMM path), else nullptr.
    auto finish = [&](int64_t b, const acc_t* lse_given) {
      std::tie(lse_p[b], loss_p[b]) = sample_loss(logit_p + b * N, N, tp[b], eps, lse_given);
    };
    const int64_t grain = batch_grain(C * d.H * d.W);
    if (gemm) {
      at::parallel_for(0, d.B, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) pool(b);
      });
      at::Tensor logits = out.logits, lse = out.lse;  // handles: the *_out functions take non-const ones
      if (bp != nullptr) at::addmm_out(logits, in.bias, out.pooled, in.w.t());
      else at::mm_out(logits, out.pooled, in.w.t());
      at::logsumexp_out(lse, logits, {1});  // vectorised exp; NaN where a logit is not finite: in finish
      at::parallel_for(0, d.B, batch_grain(N), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) finish(b, lse_p + b);
      });
      return;
    }
    at::parallel_for(0, d.B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        pool(b);
        const acc_t* pb = pool_p + b * C;
        acc_t* zb = logit_p + b * N;
        for (int64_t n = 0; n < N; ++n) zb[n] = dot(wp + n * C, pb, C) + (bp ? bp[n] : acc_t(0));
        finish(b, nullptr);
      }
    });
  });
}

// d(features)[b, c, h, w] = (sum_n dlogits[b, n] W[n, c]) / (H W), written in the requested layout.
void backward_input_cpu(const BackwardOperands& in, const at::Tensor& w, const at::Tensor& out, bool channels_last) {
  const int64_t B = in.B, N = in.N, C = w.size(1);
  const int64_t HW = out.numel() / (B * C);
  // GEMM: d(pooled) [B, C] = dlogits [B, N] . W [N, C] for the batch, then the broadcast.
  const at::Tensor dpooled = use_gemm(B, N, C) ? at::mm(dlogits(in), w) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "aux_head_loss_backward_input_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* dpp = dpooled.defined() ? dpooled.const_data_ptr<acc_t>() : nullptr;
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aux_head_loss_backward_input_store", [&] {
      scalar_t* op_ = out.data_ptr<scalar_t>();
      at::parallel_for(0, B, batch_grain(C * HW), [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> dl(dpp ? 0 : N), dp(dpp ? 0 : C);
        for (int64_t b = b0; b < b1; ++b) {
          const acc_t* dpb = dpp ? dpp + b * C : dp.data();
          if (!dpp) {
            dlogits_row<acc_t>(in, b, nullptr, dl.data());
            std::fill(dp.begin(), dp.end(), acc_t(0));
            for (int64_t n = 0; n < N; ++n) axpy(dl[n], wp + n * C, dp.data(), C);
          }
          broadcast_sample(dpb, inv_hw, C, HW, channels_last, op_ + b * C * HW);
        }
      });
    });
  });
}

// d(weight) = dlogitsᵀ · pooled and d(bias) = Σ_b dlogits, each element summed over b in a fixed
// order (deterministic): by one thread per (class, channel block) tile, or by the GEMM.
void backward_params_cpu(const BackwardOperands& in, const at::Tensor& pooled, const at::Tensor& gw,
                         const at::Tensor& gb) {
  const int64_t B = in.B, N = in.N, C = pooled.size(1);
  if (use_gemm(B, N, C)) {
    const at::Tensor dl = dlogits(in);
    at::Tensor gw_ = gw;
    at::mm_out(gw_, dl.t(), pooled);
    AT_DISPATCH_FLOATING_TYPES(dl.scalar_type(), "aux_head_loss_backward_bias_cpu", [&] {
      const scalar_t* dlp = dl.const_data_ptr<scalar_t>();
      scalar_t* gbp = gb.data_ptr<scalar_t>();
      at::parallel_for(0, N, batch_grain(B), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          scalar_t s = scalar_t(0);
          for (int64_t b = 0; b < B; ++b) s += dlp[b * N + n];
          gbp[n] = s;
        }
      });
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "aux_head_loss_backward_params_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t *zp = in.logits.const_data_ptr<acc_t>(), *gp = in.grad_losses.const_data_ptr<acc_t>();
    const acc_t *mp = in.lse.const_data_ptr<acc_t>(), *pp = pooled.const_data_ptr<acc_t>();
    const acc_t* glp = in.grad_logits.defined() ? in.grad_logits.const_data_ptr<acc_t>() : nullptr;
    const int64_t* tp = in.t.const_data_ptr<int64_t>();
    acc_t *gwp = gw.data_ptr<acc_t>(), *gbp = gb.data_ptr<acc_t>();
    const acc_t eps = static_cast<acc_t>(in.label_smoothing), inv_n = acc_t(1) / static_cast<acc_t>(N);
    constexpr int64_t kTileC = 256;
    const int64_t tiles_c = (C + kTileC - 1) / kTileC;
    at::parallel_for(0, N * tiles_c, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / tiles_c, c0 = (i % tiles_c) * kTileC, c1 = std::min(C, c0 + kTileC);
        acc_t* gwn = gwp + n * C;
        std::fill(gwn + c0, gwn + c1, acc_t(0));
        acc_t db = acc_t(0);
        for (int64_t b = 0; b < B; ++b) {
          const acc_t g = sample_grad(gp, in.grad_losses_stride, tp[b], b, N);
          const acc_t s = dlogit(g, zp[b * N + n], mp[b], n == tp[b], eps, inv_n) + (glp ? glp[b * N + n] : acc_t(0));
          db += s;
          axpy(s, pp + b * C + c0, gwn + c0, c1 - c0);
        }
        if (c0 == 0) gbp[n] = db;
      }
    });
  });
}

}  // namespace mlaan_fast::aux_head
