// Multi-tensor EMA update on CPU: shadow <- decay * shadow + (1 - decay) * live for every span of
// the table. The spans form one index space cut into equal per-thread pieces, so a list of many
// small tensors parallelises as well as one large tensor.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>

#include "ema/ema.h"

namespace mlaan_fast::ema {
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

// The functor of this op: elements [first, last) of one span.
void lerp_piece(const multi_tensor::Span& span, int64_t first, int64_t last, float w) {
  float* s = static_cast<float*>(span.target) + first;
  const int64_t n = last - first;
  switch (span.source_type) {
    case at::kFloat: lerp_f32(s, static_cast<const float*>(span.source) + first, n, w); break;
    case at::kBFloat16: lerp_bf16(s, static_cast<const c10::BFloat16*>(span.source) + first, n, w); break;
    default: lerp_f16(s, static_cast<const c10::Half*>(span.source) + first, n, w); break;
  }
}

// Below this many elements in total one thread is faster than waking the team.
constexpr int64_t kMinElementsPerThread = 1 << 15;
// Work units of the dynamic schedule: about four per thread, so a thread slowed down by another
// process does not hold up the whole update, and at most 256 KiB of shadow each. Multiples of 16
// elements, so two threads never write the same 64-byte line.
constexpr int64_t kMinPiece = 1 << 13;
constexpr int64_t kMaxPiece = 1 << 16;

}  // namespace

void update_cpu(const multi_tensor::Table& table, double decay) {
  const float w = static_cast<float>(1.0 - decay);
  const int64_t total = table.total();
  auto run = [&](int64_t begin, int64_t end) {
    table.for_each_piece(begin, end, [w](const multi_tensor::Span& span, int64_t first, int64_t last) {
      lerp_piece(span, first, last, w);
    });
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

}  // namespace mlaan_fast::ema
