// Multi-tensor EMA update on CUDA: shadow <- decay * shadow + (1 - decay) * live for any number of
// tensors in ONE launch. Block b updates one chunk of one tensor, found through the table of
// (tensor, chunk) pairs that the host half (csrc/ema/ema_cuda.cpp) built with the multi-tensor
// engine and shipped to the device; a single tensor (the flat-buffer form) needs no table at all.
// Kernel and launcher only: nothing here throws.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ema_launch.h"

namespace mlaan_fast::ema::launch {
namespace {

struct Weights {
  float w;       // 1 - decay
  float omw;     // 1 - w, the same rounding as torch.lerp
  bool small_w;  // |w| < 0.5 picks the side of lerp that is exact at its end point
};

__device__ __forceinline__ float lerp1(float s, float l, const Weights& k) {
  // torch.lerp's two-sided form: w = 0 gives s and w = 1 gives l exactly.
  return k.small_w ? fmaf(k.w, l - s, s) : fmaf(s - l, k.omw, l);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

struct BF16 {
  uint16_t bits;
};
__device__ __forceinline__ float to_float(BF16 x) { return bf16_bits_to_float(x.bits); }

// Four consecutive live values as fp32, from one 16-byte (fp32) or 8-byte (16-bit) load.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const BF16* p) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  return make_float4(bf16_bits_to_float(v.x & 0xffffu), bf16_bits_to_float(v.x >> 16),
                     bf16_bits_to_float(v.y & 0xffffu), bf16_bits_to_float(v.y >> 16));
}
__device__ __forceinline__ float4 load4(const __half* p) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&v.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&v.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

__device__ __forceinline__ float4 lerp4(float4 s, float4 l, const Weights& k) {
  return make_float4(lerp1(s.x, l.x, k), lerp1(s.y, l.y, k), lerp1(s.z, l.z, k), lerp1(s.w, l.w, k));
}

// One chunk of at most kChunk elements; s and l already point at the chunk's first element.
template <typename live_t>
__device__ __forceinline__ void ema_chunk(float* __restrict__ s, const live_t* __restrict__ l, int64_t n,
                                          bool aligned, const Weights& k) {
  if (aligned && n == kChunk) {
    float4 sv[kUnroll], lv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = (int64_t(u) * kThreads + threadIdx.x) * kVec;
      sv[u] = *reinterpret_cast<const float4*>(s + i);
      lv[u] = load4(l + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = (int64_t(u) * kThreads + threadIdx.x) * kVec;
      *reinterpret_cast<float4*>(s + i) = lerp4(sv[u], lv[u], k);
    }
    return;
  }
  const int64_t nvec = aligned ? n / kVec : 0;
  for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
    const int64_t i = v * kVec;
    *reinterpret_cast<float4*>(s + i) = lerp4(*reinterpret_cast<const float4*>(s + i), load4(l + i), k);
  }
  for (int64_t i = nvec * kVec + threadIdx.x; i < n; i += kThreads) s[i] = lerp1(s[i], to_float(l[i]), k);
}

// chunks == nullptr: one tensor, passed by value in `single`, and block b updates its chunk b.
__global__ void __launch_bounds__(kThreads) _ema_kernel(const Entry* __restrict__ entries,
                                                        const ChunkRef* __restrict__ chunks, Entry single,
                                                        Weights k) {
  const bool from_table = chunks != nullptr;
  const ChunkRef c = from_table ? chunks[blockIdx.x] : ChunkRef{0, int32_t(blockIdx.x)};
  const Entry e = from_table ? entries[c.tensor] : single;
  const int64_t begin = int64_t(c.chunk) * kChunk;
  const int64_t n = min(kChunk, e.numel - begin);
  float* s = e.shadow + begin;
  const bool aligned = e.aligned != 0;
  switch (e.live_type) {
    case LiveType::kFloat32: ema_chunk(s, static_cast<const float*>(e.live) + begin, n, aligned, k); break;
    case LiveType::kBFloat16: ema_chunk(s, static_cast<const BF16*>(e.live) + begin, n, aligned, k); break;
    default: ema_chunk(s, static_cast<const __half*>(e.live) + begin, n, aligned, k); break;
  }
}

}  // namespace

int update(const Update& a, Stream stream) {
  const Weights k{a.w, 1.0f - a.w, std::abs(a.w) < 0.5f};
  const auto grid = static_cast<unsigned>(a.chunks_count);
  _ema_kernel<<<grid, kThreads, 0, stream>>>(a.entries, a.chunks, a.single, k);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace mlaan_fast::ema::launch
