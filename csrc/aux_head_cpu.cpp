// Fused auxiliary-head loss on CPU: global-average-pool -> Linear -> softmax cross-entropy.
// Forward reads each sample's features once (parallel over the batch) and keeps the logits, the
// pooled vector and the log-sum-exp; backward rebuilds d(logits) from them.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "aux_head.h"
#include "checks.h"

namespace mlaan_fast::aux_head {

Dims check_forward_inputs(const char* op, const at::Tensor& features, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& target,
                          double label_smoothing) {
  MLAAN_CHECK_VALUE(features.dim() == 2 || features.dim() == 4, op,
                    ": features must be [B, C, H, W] or [B, C], got rank ", features.dim());
  MLAAN_CHECK_TYPE(at::isFloatingType(features.scalar_type()), op,
                   ": features must be floating point, got ", features.scalar_type());
  MLAAN_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [N, C], got shape ", weight.sizes());
  MLAAN_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), op,
                   ": weight must be floating point, got ", weight.scalar_type());
  MLAAN_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
                   target.scalar_type());
  Dims d{};
  d.B = features.size(0);
  d.C = features.size(1);
  d.H = features.dim() == 4 ? features.size(2) : 1;
  d.W = features.dim() == 4 ? features.size(3) : 1;
  d.N = weight.size(0);
  MLAAN_CHECK_VALUE(d.B > 0, op, ": features has batch size 0 (B must be >= 1)");
  MLAAN_CHECK_VALUE(d.C > 0 && d.H > 0 && d.W > 0, op, ": features has an empty dimension, shape ",
                    features.sizes());
  MLAAN_CHECK_VALUE(d.N > 0, op, ": weight has 0 classes");
  MLAAN_CHECK_VALUE(weight.size(1) == d.C, op, ": weight has ", weight.size(1),
                    " input channels but features have C = ", d.C);
  MLAAN_CHECK_VALUE(target.dim() == 1 && target.size(0) == d.B, op,
                    ": target must be [B] = [", d.B, "], got shape ", target.sizes());
  MLAAN_CHECK_VALUE(weight.device() == features.device(), op, ": weight is on ", weight.device(),
                    " but features are on ", features.device());
  MLAAN_CHECK_VALUE(target.device() == features.device(), op, ": target is on ", target.device(),
                    " but features are on ", features.device());
  if (bias.has_value()) {
    MLAAN_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d.N, op, ": bias must be [N] = [", d.N,
                      "], got shape ", bias->sizes());
    MLAAN_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), op,
                     ": bias must be floating point, got ", bias->scalar_type());
    MLAAN_CHECK_VALUE(bias->device() == features.device(), op, ": bias is on ", bias->device(),
                      " but features are on ", features.device());
  }
  MLAAN_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  d.stride_b = features.stride(0);
  d.stride_c = features.stride(1);
  d.stride_h = features.dim() == 4 ? features.stride(2) : 0;
  d.stride_w = features.dim() == 4 ? features.stride(3) : 0;
  return d;
}

std::pair<int64_t, int64_t> check_backward_inputs(const char* op, const at::Tensor& grad_losses,
                                                  const std::optional<at::Tensor>& grad_logits,
                                                  const at::Tensor& logits, const at::Tensor& lse,
                                                  const at::Tensor& target, double label_smoothing) {
  MLAAN_CHECK_VALUE(logits.dim() == 2 && logits.size(0) > 0 && logits.size(1) > 0, op,
                    ": logits must be a non-empty [B, N], got shape ", logits.sizes());
  const int64_t B = logits.size(0), N = logits.size(1);
  const auto dtype = logits.scalar_type();
  MLAAN_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": logits must be float32 or float64, got ", dtype);
  MLAAN_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
                   target.scalar_type());
  MLAAN_CHECK_VALUE(target.dim() == 1 && target.size(0) == B, op, ": target must be [", B,
                    "], got shape ", target.sizes());
  MLAAN_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == B, op, ": lse must be [", B, "], got shape ",
                    lse.sizes());
  MLAAN_CHECK_VALUE(grad_losses.dim() == 1 && grad_losses.size(0) == B, op,
                    ": grad_losses must be [", B, "], got shape ", grad_losses.sizes());
  MLAAN_CHECK_TYPE(lse.scalar_type() == dtype && grad_losses.scalar_type() == dtype, op,
                   ": lse and grad_losses must have the logits dtype ", dtype);
  for (const at::Tensor* t : {&grad_losses, &lse, &target}) {
    MLAAN_CHECK_VALUE(t->device() == logits.device(), op, ": all tensors must be on ",
                      logits.device(), ", found one on ", t->device());
  }
  if (grad_logits.has_value()) {
    MLAAN_CHECK_VALUE(grad_logits->sizes() == logits.sizes(), op, ": grad_logits must be [", B,
                      ", ", N, "], got shape ", grad_logits->sizes());
    MLAAN_CHECK_TYPE(grad_logits->scalar_type() == dtype, op,
                     ": grad_logits must have the logits dtype ", dtype);
    MLAAN_CHECK_VALUE(grad_logits->device() == logits.device(), op, ": grad_logits is on ",
                      grad_logits->device(), " but logits are on ", logits.device());
  }
  MLAAN_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  return {B, N};
}

at::ScalarType compute_dtype(const at::Tensor& features, const at::Tensor& weight) {
  return (features.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble) ? at::kDouble
                                                                                        : at::kFloat;
}

std::pair<int64_t, int64_t> check_backward_params_inputs(const char* op, const at::Tensor& grad_losses,
                                                         const std::optional<at::Tensor>& grad_logits,
                                                         const at::Tensor& logits, const at::Tensor& lse,
                                                         const at::Tensor& pooled, const at::Tensor& target,
                                                         double label_smoothing) {
  const auto [B, N] = check_backward_inputs(op, grad_losses, grad_logits, logits, lse, target, label_smoothing);
  MLAAN_CHECK_VALUE(pooled.dim() == 2 && pooled.size(0) == B, op, ": pooled must be [", B, ", C], got shape ",
                    pooled.sizes());
  MLAAN_CHECK_TYPE(pooled.scalar_type() == logits.scalar_type(), op, ": pooled must have the logits dtype");
  MLAAN_CHECK_VALUE(pooled.device() == logits.device(), op, ": pooled is on ", pooled.device(),
                    " but logits are on ", logits.device());
  return {B, N};
}

void check_target_range_cpu(const char* op, const at::Tensor& target, int64_t N) {
  const at::Tensor t = target.contiguous();
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    MLAAN_CHECK_VALUE(p[i] >= 0 && p[i] < N, op, ": target[", i, "] = ", p[i],
                      " is outside the class range [0, ", N, ")");
  }
}

namespace {

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
    acc_t s = acc_t(0);
    if (dense_plane) {
      const int64_t hw = d.H * d.W;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < hw; ++i) s += static_cast<acc_t>(plane[i]);
    } else {
      for (int64_t h = 0; h < d.H; ++h)
        for (int64_t w = 0; w < d.W; ++w) s += static_cast<acc_t>(plane[h * d.stride_h + w * d.stride_w]);
    }
    acc[c] = s;
  }
}

// y[i] += s * x[i]
template <typename acc_t>
void axpy(acc_t s, const acc_t* x, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += s * x[i];
}

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = acc_t(0);
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// d loss_b / d z_n scaled by g: g * (softmax_n - (1 - eps) [n == t] - eps / N).
template <typename acc_t>
inline acc_t dlogit(acc_t g, acc_t z, acc_t lse, bool is_target, acc_t eps, acc_t inv_n) {
  return g * (std::exp(z - lse) - (is_target ? acc_t(1) - eps : acc_t(0)) - eps * inv_n);
}

void forward_into(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& target, double label_smoothing, const Dims& d, at::Tensor& losses,
                  at::Tensor& logits, at::Tensor& pooled, at::Tensor& lse) {
  const auto cdt = losses.scalar_type();
  // fp64 compute (gradcheck) reads fp64 features; every other case reads the features as they are.
  const at::Tensor x = (cdt == at::kDouble && features.scalar_type() != at::kDouble) ? features.to(at::kDouble) : features;
  const Dims dx = cdt == at::kDouble ? check_forward_inputs("aux_head_loss_forward", x, weight, bias, target, label_smoothing) : d;
  const at::Tensor w = weight.to(cdt).contiguous();
  const at::Tensor bvec = bias.has_value() ? bias->to(cdt).contiguous() : at::Tensor();
  const at::Tensor t = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aux_head_loss_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = bias.has_value() ? bvec.const_data_ptr<acc_t>() : nullptr;
    const int64_t* tp = t.const_data_ptr<int64_t>();
    acc_t* loss_p = losses.data_ptr<acc_t>();
    acc_t* logit_p = logits.data_ptr<acc_t>();
    acc_t* pool_p = pooled.data_ptr<acc_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(dx.H * dx.W);
    const acc_t eps = static_cast<acc_t>(label_smoothing);
    const int64_t C = dx.C, N = dx.N;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * dx.H * dx.W));
    at::parallel_for(0, dx.B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* pb = pool_p + b * C;
        pool_sample<scalar_t, acc_t>(xp + b * dx.stride_b, dx, pb);
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
        const acc_t m = finite ? zmax + std::log(se) : std::numeric_limits<acc_t>::quiet_NaN();
        lse_p[b] = m;
        loss_p[b] = m - (acc_t(1) - eps) * zb[tp[b]] - eps * zsum / static_cast<acc_t>(N);
      }
    });
  });
}

void check_forward_outputs(const Dims& d, at::ScalarType cdt, const at::Tensor& features, const at::Tensor& losses,
                           const at::Tensor& logits, const at::Tensor& pooled, const at::Tensor& lse) {
  const char* op = "aux_head_loss_forward_out";
  const std::pair<const char*, const at::Tensor*> outs[] = {{"losses", &losses}, {"logits", &logits}, {"pooled", &pooled}, {"lse", &lse}};
  const std::vector<int64_t> shapes[] = {{d.B}, {d.B, d.N}, {d.B, d.C}, {d.B}};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& o = *outs[i].second;
    MLAAN_CHECK_VALUE(o.sizes() == at::IntArrayRef(shapes[i]), op, ": ", outs[i].first, " must have shape ",
                      at::IntArrayRef(shapes[i]), ", got ", o.sizes());
    MLAAN_CHECK_TYPE(o.scalar_type() == cdt, op, ": ", outs[i].first, " must be ", cdt, ", got ", o.scalar_type());
    MLAAN_CHECK_VALUE(o.is_contiguous(), op, ": ", outs[i].first, " must be contiguous");
    MLAAN_CHECK_VALUE(o.device() == features.device(), op, ": ", outs[i].first, " is on ", o.device(),
                      " but features are on ", features.device());
  }
}

void forward_out_cpu(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& target, double label_smoothing, at::Tensor losses, at::Tensor logits,
                     at::Tensor pooled, at::Tensor lse) {
  const char* op = "aux_head_loss_forward";
  const Dims d = check_forward_inputs(op, features, weight, bias, target, label_smoothing);
  check_forward_outputs(d, compute_dtype(features, weight), features, losses, logits, pooled, lse);
  check_target_range_cpu(op, target, d.N);
  forward_into(features, weight, bias, target, label_smoothing, d, losses, logits, pooled, lse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& features, const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       const at::Tensor& target, double label_smoothing) {
  const char* op = "aux_head_loss_forward";
  const Dims d = check_forward_inputs(op, features, weight, bias, target, label_smoothing);
  check_target_range_cpu(op, target, d.N);
  const auto opts = features.options().dtype(compute_dtype(features, weight));
  at::Tensor losses = at::empty({d.B}, opts), logits = at::empty({d.B, d.N}, opts);
  at::Tensor pooled = at::empty({d.B, d.C}, opts), lse = at::empty({d.B}, opts);
  forward_into(features, weight, bias, target, label_smoothing, d, losses, logits, pooled, lse);
  return {losses, logits, pooled, lse};
}

// d(features)[b, c, h, w] = (sum_n dlogits[b, n] W[n, c]) / (H W), written in the requested layout.
at::Tensor backward_input_cpu(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_logits,
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
  MLAAN_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == features_shape[1], op,
                    ": weight must be [", N, ", ", features_shape[1], "], got shape ", weight.sizes());
  MLAAN_CHECK_VALUE(weight.device() == logits.device(), op, ": weight is on ", weight.device(),
                    " but logits are on ", logits.device());
  check_target_range_cpu(op, target, N);
  const int64_t C = features_shape[1];
  const int64_t HW = features_shape.size() == 4 ? features_shape[2] * features_shape[3] : 1;
  const auto cdt = logits.scalar_type();
  auto opts = logits.options().dtype(features_dtype);
  at::Tensor out = at::empty(features_shape, opts.memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                              : at::MemoryFormat::Contiguous));
  const at::Tensor w = weight.to(cdt).contiguous();
  const at::Tensor z = logits.contiguous(), g = grad_losses.contiguous(), m = lse.contiguous(), t = target.contiguous();
  const at::Tensor gl = grad_logits.has_value() ? grad_logits->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(cdt, "aux_head_loss_backward_input_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t *wp = w.const_data_ptr<acc_t>(), *zp = z.const_data_ptr<acc_t>(), *gp = g.const_data_ptr<acc_t>();
    const acc_t *mp = m.const_data_ptr<acc_t>(), *glp = grad_logits.has_value() ? gl.const_data_ptr<acc_t>() : nullptr;
    const int64_t* tp = t.const_data_ptr<int64_t>();
    const acc_t eps = static_cast<acc_t>(label_smoothing), inv_n = acc_t(1) / static_cast<acc_t>(N);
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features_dtype, "aux_head_loss_backward_input_store", [&] {
      scalar_t* op_ = out.data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * HW));
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> dl(N), dp(C);
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t n = 0; n < N; ++n)
            dl[n] = dlogit(gp[b], zp[b * N + n], mp[b], n == tp[b], eps, inv_n) + (glp ? glp[b * N + n] : acc_t(0));
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
  return out;
}

// d(weight) = dlogitsᵀ · pooled and d(bias) = Σ_b dlogits, each element summed over b in a fixed
// order by one thread (deterministic), tiles of (class, channel block) in parallel.
std::tuple<at::Tensor, at::Tensor> backward_params_cpu(const at::Tensor& grad_losses,
                                                       const std::optional<at::Tensor>& grad_logits,
                                                       const at::Tensor& logits, const at::Tensor& lse,
                                                       const at::Tensor& pooled, const at::Tensor& target,
                                                       double label_smoothing) {
  const char* op = "aux_head_loss_backward_params";
  const auto [B, N] = check_backward_params_inputs(op, grad_losses, grad_logits, logits, lse, pooled, target,
                                                   label_smoothing);
  check_target_range_cpu(op, target, N);
  const int64_t C = pooled.size(1);
  const auto cdt = logits.scalar_type();
  at::Tensor gw = at::empty({N, C}, logits.options()), gb = at::empty({N}, logits.options());
  const at::Tensor z = logits.contiguous(), g = grad_losses.contiguous(), m = lse.contiguous(), t = target.contiguous();
  const at::Tensor p = pooled.contiguous();
  const at::Tensor gl = grad_logits.has_value() ? grad_logits->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(cdt, "aux_head_loss_backward_params_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t *zp = z.const_data_ptr<acc_t>(), *gp = g.const_data_ptr<acc_t>(), *mp = m.const_data_ptr<acc_t>();
    const acc_t *pp = p.const_data_ptr<acc_t>(), *glp = grad_logits.has_value() ? gl.const_data_ptr<acc_t>() : nullptr;
    const int64_t* tp = t.const_data_ptr<int64_t>();
    acc_t *gwp = gw.data_ptr<acc_t>(), *gbp = gb.data_ptr<acc_t>();
    const acc_t eps = static_cast<acc_t>(label_smoothing), inv_n = acc_t(1) / static_cast<acc_t>(N);
    constexpr int64_t kTileC = 256;
    const int64_t tiles_c = (C + kTileC - 1) / kTileC;
    at::parallel_for(0, N * tiles_c, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / tiles_c, c0 = (i % tiles_c) * kTileC, c1 = std::min(C, c0 + kTileC);
        acc_t* gwn = gwp + n * C;
        std::fill(gwn + c0, gwn + c1, acc_t(0));
        acc_t db = acc_t(0);
        for (int64_t b = 0; b < B; ++b) {
          const acc_t s = dlogit(gp[b], zp[b * N + n], mp[b], n == tp[b], eps, inv_n) + (glp ? glp[b * N + n] : acc_t(0));
          db += s;
          axpy(s, pp + b * C + c0, gwn + c0, c1 - c0);
        }
        if (c0 == 0) gbp[n] = db;
      }
    });
  });
  return {gw, gb};
}

}  // namespace

}  // namespace mlaan_fast::aux_head

TORCH_LIBRARY_IMPL(mlaan_fast, CPU, m) {
  m.impl("aux_head_loss_forward", &mlaan_fast::aux_head::forward_cpu);
  m.impl("aux_head_loss_forward_out", &mlaan_fast::aux_head::forward_out_cpu);
  m.impl("aux_head_loss_backward_input", &mlaan_fast::aux_head::backward_input_cpu);
  m.impl("aux_head_loss_backward_params", &mlaan_fast::aux_head::backward_params_cpu);
}
