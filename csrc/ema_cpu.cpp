// Multi-tensor EMA update on CPU: shadow[i] <- decay * shadow[i] + (1 - decay) * live[i].
// All elements of all tensors form one index space that is cut into equal per-thread ranges,
// so a list of many small tensors parallelises as well as one large tensor.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"

namespace mlaan_fast {

// Shared by the CPU and CUDA kernels: every violation names the list index and the problem.
void ema_check_inputs(const at::TensorList shadow, const at::TensorList live, double decay) {
  MLAAN_CHECK_VALUE(shadow.size() == live.size(), "ema_update_: shadow has ", shadow.size(),
                    " tensors but live has ", live.size());
  MLAAN_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, "ema_update_: decay must be in [0, 1], got ", decay);
  if (shadow.empty()) return;
  const c10::Device device = shadow[0].device();
  for (size_t i = 0; i < shadow.size(); ++i) {
    const at::Tensor& s = shadow[i];
    const at::Tensor& l = live[i];
    MLAAN_CHECK_VALUE(s.device() == device, "ema_update_: shadow[", i, "] is on ", s.device(),
                      " but shadow[0] is on ", device, " (all tensors must be on one device)");
    MLAAN_CHECK_VALUE(l.device() == device, "ema_update_: live[", i, "] is on ", l.device(),
                      " but shadow[0] is on ", device, " (all tensors must be on one device)");
    MLAAN_CHECK_TYPE(s.scalar_type() == at::kFloat, "ema_update_: shadow[", i,
                     "] must be float32, got ", s.scalar_type());
    const auto lt = l.scalar_type();
    MLAAN_CHECK_TYPE(lt == at::kFloat || lt == at::kBFloat16 || lt == at::kHalf, "ema_update_: live[", i,
                     "] must be float32, bfloat16 or float16, got ", lt);
    MLAAN_CHECK_VALUE(s.sizes() == l.sizes(), "ema_update_: shape mismatch at index ", i, ": shadow[", i,
                      "] has shape ", s.sizes(), " but live[", i, "] has shape ", l.sizes());
    MLAAN_CHECK_VALUE(s.is_contiguous(), "ema_update_: shadow[", i, "] must be contiguous (it is updated in place)");
  }
}

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// lerp(s, l, w) with w = 1 - decay, in the two-sided form torch.lerp uses, so that w = 0 and
// w = 1 reproduce s and l exactly. The branch is uniform, so both loops vectorise.
template <typename live_t>
inline __attribute__((always_inline)) void lerp_span(float* __restrict s, const live_t* __restrict l, int64_t n,
                                                     float w) {
  if (std::abs(w) < 0.5f) {
    for (int64_t i = 0; i < n; ++i) s[i] = s[i] + w * (to_float(l[i]) - s[i]);
  } else {
    const float omw = 1.0f - w;
    for (int64_t i = 0; i < n; ++i) {
      const float x = to_float(l[i]);
      s[i] = x - (x - s[i]) * omw;
    }
  }
}

// One copy of each loop per vector width, picked at load time for the CPU at hand (the build
// targets baseline x86-64, whose 16-byte vectors leave cache-resident updates compute-bound).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MLAAN_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MLAAN_VECTOR_CLONES
#endif

MLAAN_VECTOR_CLONES void lerp_f32(float* s, const float* l, int64_t n, float w) { lerp_span(s, l, n, w); }
MLAAN_VECTOR_CLONES void lerp_bf16(float* s, const c10::BFloat16* l, int64_t n, float w) { lerp_span(s, l, n, w); }
MLAAN_VECTOR_CLONES void lerp_f16(float* s, const c10::Half* l, int64_t n, float w) { lerp_span(s, l, n, w); }

struct Span {
  float* shadow;
  const void* live;
  at::ScalarType live_type;
};

void lerp_range(const Span& t, int64_t begin, int64_t end, float w) {
  const int64_t n = end - begin;
  float* s = t.shadow + begin;
  switch (t.live_type) {
    case at::kFloat: lerp_f32(s, static_cast<const float*>(t.live) + begin, n, w); break;
    case at::kBFloat16: lerp_bf16(s, static_cast<const c10::BFloat16*>(t.live) + begin, n, w); break;
    default: lerp_f16(s, static_cast<const c10::Half*>(t.live) + begin, n, w); break;
  }
}

// Below this many elements in total one thread is faster than waking the team.
constexpr int64_t kMinElementsPerThread = 1 << 15;
// Work units of the dynamic schedule: about four per thread, so a thread slowed down by another
// process does not hold up the whole update, and at most 256 KiB of shadow each. Multiples of 16
// elements, so two threads never write the same 64-byte line.
constexpr int64_t kMinPiece = 1 << 13;
constexpr int64_t kMaxPiece = 1 << 16;

void ema_update_cpu(at::TensorList shadow, at::TensorList live, double decay) {
  ema_check_inputs(shadow, live, decay);
  std::vector<at::Tensor> live_c;  // keeps contiguous copies of strided live tensors alive
  std::vector<Span> spans;
  std::vector<int64_t> starts;  // starts[k]: global index of spans[k]'s first element
  spans.reserve(shadow.size());
  starts.reserve(shadow.size() + 1);
  int64_t total = 0;
  for (size_t i = 0; i < shadow.size(); ++i) {
    const int64_t n = shadow[i].numel();
    if (n == 0) continue;
    const at::Tensor* l = &live[i];
    if (!l->is_contiguous()) {
      live_c.push_back(l->contiguous());
      l = &live_c.back();
    }
    spans.push_back({shadow[i].data_ptr<float>(), l->data_ptr(), l->scalar_type()});
    starts.push_back(total);
    total += n;
  }
  starts.push_back(total);
  if (total == 0) return;

  const float w = static_cast<float>(1.0 - decay);
  auto run = [&](int64_t begin, int64_t end) {
    // The span holding `begin`: the last start <= begin.
    size_t k = std::upper_bound(starts.begin(), starts.end() - 1, begin) - starts.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, starts[k + 1]);
      lerp_range(spans[k], begin - starts[k], stop - starts[k], w);
      begin = stop;
      ++k;
    }
  };

  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), total / kMinElementsPerThread);
  if (nthreads <= 1 || at::in_parallel_region()) {
    run(0, total);
    return;
  }
  const int64_t piece = std::clamp((total / (4 * nthreads) + 15) / 16 * 16, kMinPiece, kMaxPiece);
  const int64_t pieces = (total + piece - 1) / piece;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t p = 0; p < pieces; ++p) run(p * piece, std::min(total, (p + 1) * piece));
}

}  // namespace

TORCH_LIBRARY_IMPL(mlaan_fast, CPU, m) {
  m.impl("ema_update_", &ema_update_cpu);
}

}  // namespace mlaan_fast
