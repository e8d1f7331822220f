// Multi-tensor EMA update on CUDA: shadow[i] <- decay * shadow[i] + (1 - decay) * live[i] for any
// number of tensors in ONE launch. The host writes a table (one entry per tensor, one
// (tensor, chunk) pair per block) into pinned memory and ships it with a single async copy on
// the current stream; block b then updates chunk chunks[b].chunk of tensor chunks[b].tensor.
// A single pair (the flat-buffer form) travels in the kernel arguments instead: no copy at all.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace mlaan_fast {

// Defined in csrc/ema_cpu.cpp: the input checks shared with the CPU kernel.
void ema_check_inputs(const at::TensorList shadow, const at::TensorList live, double decay);

namespace {

enum LiveType : int32_t { kLiveF32 = 0, kLiveBF16 = 1, kLiveF16 = 2 };

struct EmaEntry {
  float* shadow;
  const void* live;
  int64_t numel;
  int32_t live_type;
  int32_t aligned;  // both pointers allow 16-byte shadow / 4-element live vector accesses
};
static_assert(sizeof(EmaEntry) == 32, "EmaEntry is shipped as raw bytes");

struct ChunkRef {
  int32_t tensor;
  int32_t chunk;
};

constexpr int kThreads = 256;
constexpr int kVec = 4;     // elements per vector access: 16 bytes of fp32 shadow
constexpr int kUnroll = 4;  // independent vector accesses in flight per thread
constexpr int64_t kChunk = int64_t(kThreads) * kVec * kUnroll;

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
__global__ void __launch_bounds__(kThreads) _ema_kernel(const EmaEntry* __restrict__ entries,
                                                        const ChunkRef* __restrict__ chunks, EmaEntry single,
                                                        Weights k) {
  const bool from_table = chunks != nullptr;
  const ChunkRef c = from_table ? chunks[blockIdx.x] : ChunkRef{0, int32_t(blockIdx.x)};
  const EmaEntry e = from_table ? entries[c.tensor] : single;
  const int64_t begin = int64_t(c.chunk) * kChunk;
  const int64_t n = min(kChunk, e.numel - begin);
  float* s = e.shadow + begin;
  const bool aligned = e.aligned != 0;
  switch (e.live_type) {
    case kLiveF32: ema_chunk(s, static_cast<const float*>(e.live) + begin, n, aligned, k); break;
    case kLiveBF16: ema_chunk(s, static_cast<const BF16*>(e.live) + begin, n, aligned, k); break;
    default: ema_chunk(s, static_cast<const __half*>(e.live) + begin, n, aligned, k); break;
  }
}

int32_t live_type_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kLiveF32;
    case at::kBFloat16: return kLiveBF16;
    default: return kLiveF16;  // ema_check_inputs admits only fp32, bf16 and fp16
  }
}

void ema_update_cuda(at::TensorList shadow, at::TensorList live, double decay) {
  ema_check_inputs(shadow, live, decay);
  if (shadow.empty()) return;
  const c10::cuda::CUDAGuard guard(shadow[0].device());

  std::vector<at::Tensor> live_c;  // contiguous copies of strided live tensors, alive until launch
  std::vector<EmaEntry> entries;
  std::vector<int64_t> first_chunk;  // prefix sum of chunk counts over the kept entries
  entries.reserve(shadow.size());
  first_chunk.reserve(shadow.size() + 1);
  int64_t n_chunks = 0;
  for (size_t i = 0; i < shadow.size(); ++i) {
    const int64_t n = shadow[i].numel();
    if (n == 0) continue;
    const at::Tensor* l = &live[i];
    if (!l->is_contiguous()) {
      live_c.push_back(l->contiguous());
      l = &live_c.back();
    }
    float* s = shadow[i].data_ptr<float>();
    const auto lp = reinterpret_cast<uintptr_t>(l->data_ptr());
    const bool aligned = reinterpret_cast<uintptr_t>(s) % 16 == 0 && lp % (kVec * l->element_size()) == 0;
    entries.push_back({s, l->data_ptr(), n, live_type_code(l->scalar_type()), aligned ? 1 : 0});
    first_chunk.push_back(n_chunks);
    n_chunks += (n + kChunk - 1) / kChunk;
  }
  if (n_chunks == 0) return;
  TORCH_CHECK(n_chunks <= std::numeric_limits<int32_t>::max(), "ema_update_: ", n_chunks,
              " chunks exceed the grid limit; split the list");

  const float w = static_cast<float>(1.0 - decay);
  const Weights k{w, 1.0f - w, std::abs(w) < 0.5f};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto grid = static_cast<unsigned>(n_chunks);
  if (entries.size() == 1) {
    _ema_kernel<<<grid, kThreads, 0, stream>>>(nullptr, nullptr, entries[0], k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  // One pinned staging buffer from torch's caching host allocator: a non_blocking copy_ records
  // an event on the stream, so the block is not reused before the copy has read it.
  const int64_t entry_bytes = int64_t(entries.size()) * int64_t(sizeof(EmaEntry));
  const int64_t bytes = entry_bytes + n_chunks * int64_t(sizeof(ChunkRef));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* base = static_cast<uint8_t*>(host.data_ptr());
  std::memcpy(base, entries.data(), entry_bytes);
  auto* chunks = reinterpret_cast<ChunkRef*>(base + entry_bytes);
  for (size_t t = 0; t < entries.size(); ++t) {
    const int64_t count = (entries[t].numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < count; ++c) chunks[first_chunk[t] + c] = {int32_t(t), int32_t(c)};
  }
  at::Tensor table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(shadow[0].device()));
  table.copy_(host, /*non_blocking=*/true);
  const auto* d_base = static_cast<const uint8_t*>(table.data_ptr());
  _ema_kernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const EmaEntry*>(d_base),
                                             reinterpret_cast<const ChunkRef*>(d_base + entry_bytes), EmaEntry{}, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(mlaan_fast, CUDA, m) {
  m.impl("ema_update_", &ema_update_cuda);
}

}  // namespace mlaan_fast
