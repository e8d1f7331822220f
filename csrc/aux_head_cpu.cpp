// Fused auxiliary-head loss on CPU: global-average-pool -> Linear -> softmax cross-entropy.
// Forward reads each sample's features once (parallel over the batch) and keeps the logits, the
// pooled vector and the log-sum-exp; backward rebuilds d(logits) from them. Kernels only: the
// operators in aux_head_ops.cpp check and convert the operands first.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "aux_head.h"

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

// d loss_b / d z_n scaled by g: g * (softmax_n - (1 - eps) [n == t] - eps / N).
template <typename acc_t>
inline acc_t dlogit(acc_t g, acc_t z, acc_t lse, bool is_target, acc_t eps, acc_t inv_n) {
  return g * (std::exp(z - lse) - (is_target ? acc_t(1) - eps : acc_t(0)) - eps * inv_n);
}

// Scale of sample b's gradients: NaN when its target is outside [0, N) (an unchecked target).
template <typename acc_t>
inline acc_t sample_grad(const acc_t* grad_losses, int64_t stride, int64_t t, int64_t b, int64_t N) {
  return (t < 0 || t >= N) ? std::numeric_limits<acc_t>::quiet_NaN() : grad_losses[b * stride];
}

}  // namespace

void forward_cpu(const ForwardOperands& in, const ForwardOutputs& out) {
  const Dims& d = in.d;
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
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    const int64_t C = d.C, N = d.N;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * d.H * d.W));
    at::parallel_for(0, d.B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* pb = pool_p + b * C;
        pool_sample<scalar_t, acc_t>(xp + b * d.stride_b, d, pb);
        for (int64_t c = 0; c < C; ++c) pb[c] *= inv_hw;
        acc_t* zb = logit_p + b * N;
        acc_t zmax = -std::numeric_limits<acc_t>::infinity();
        acc_t zsum = acc_t(0);
        bool finite = true;
        for (int64_t n = 0; n < N; ++n) {
          const acc_t z = dot(wp + n * C, pb, C) + (bp ? bp[n] : acc_t(0));
          zb[n] = z;
          finite &= std::isfinite(z);
          zmax = std::max(zmax, z);
          zsum += z;
        }
        acc_t se = acc_t(0);
        for (int64_t n = 0; n < N; ++n) se += std::exp(zb[n] - zmax);
        // Non-finite logits (from non-finite features or weights) give a NaN loss, never a number.
        const acc_t m = finite ? zmax + std::log(se) : nan;
        lse_p[b] = m;
        const int64_t t = tp[b];
        loss_p[b] = (t < 0 || t >= N) ? nan : m - (acc_t(1) - eps) * zb[t] - eps * zsum / static_cast<acc_t>(N);
      }
    });
  });
}

// d(features)[b, c, h, w] = (sum_n dlogits[b, n] W[n, c]) / (H W), written in the requested layout.
void backward_input_cpu(const BackwardOperands& in, const at::Tensor& w, const at::Tensor& out, bool channels_last) {
  const int64_t B = in.B, N = in.N, C = w.size(1);
  const int64_t HW = out.numel() / (B * C);
  const at::Tensor& gl = in.grad_logits;
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "aux_head_loss_backward_input_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t *wp = w.const_data_ptr<acc_t>(), *zp = in.logits.const_data_ptr<acc_t>();
    const acc_t *gp = in.grad_losses.const_data_ptr<acc_t>(), *mp = in.lse.const_data_ptr<acc_t>();
    const acc_t* glp = gl.defined() ? gl.const_data_ptr<acc_t>() : nullptr;
    const int64_t* tp = in.t.const_data_ptr<int64_t>();
    const acc_t eps = static_cast<acc_t>(in.label_smoothing), inv_n = acc_t(1) / static_cast<acc_t>(N);
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "aux_head_loss_backward_input_store", [&] {
      scalar_t* op_ = out.data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * HW));
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> dl(N), dp(C);
        for (int64_t b = b0; b < b1; ++b) {
          const acc_t g = sample_grad(gp, in.grad_losses_stride, tp[b], b, N);
          for (int64_t n = 0; n < N; ++n)
            dl[n] = dlogit(g, zp[b * N + n], mp[b], n == tp[b], eps, inv_n) + (glp ? glp[b * N + n] : acc_t(0));
          std::fill(dp.begin(), dp.end(), acc_t(0));
          for (int64_t n = 0; n < N; ++n) axpy(dl[n], wp + n * C, dp.data(), C);
          scalar_t* ob = op_ + b * C * HW;
          if (channels_last) {
            std::vector<scalar_t> row(C);
            for (int64_t c = 0; c < C; ++c) row[c] = static_cast<scalar_t>(dp[c] * inv_hw);
            for (int64_t p = 0; p < HW; ++p) std::copy(row.begin(), row.end(), ob + p * C);
          } else {
            for (int64_t c = 0; c < C; ++c) std::fill(ob + c * HW, ob + (c + 1) * HW, static_cast<scalar_t>(dp[c] * inv_hw));
          }
        }
      });
    });
  });
}

// d(weight) = dlogitsᵀ · pooled and d(bias) = Σ_b dlogits, each element summed over b in a fixed
// order by one thread (deterministic), tiles of (class, channel block) in parallel.
void backward_params_cpu(const BackwardOperands& in, const at::Tensor& pooled, const at::Tensor& gw,
                         const at::Tensor& gb) {
  const int64_t B = in.B, N = in.N, C = pooled.size(1);
  const at::Tensor& gl = in.grad_logits;
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "aux_head_loss_backward_params_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t *zp = in.logits.const_data_ptr<acc_t>(), *gp = in.grad_losses.const_data_ptr<acc_t>();
    const acc_t *mp = in.lse.const_data_ptr<acc_t>(), *pp = pooled.const_data_ptr<acc_t>();
    const acc_t* glp = gl.defined() ? gl.const_data_ptr<acc_t>() : nullptr;
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
