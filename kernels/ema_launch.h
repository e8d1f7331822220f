// Launcher of the multi-tensor EMA CUDA kernel (kernels/ema.cu). Plain structs of raw pointers and
// sizes only: no ATen and no CUDA headers, so g++-compiled host code (csrc/ema/ema_cuda.cpp) can
// call it. The launcher never throws: it returns the CUDA error code of its launch (0 = success).
#pragma once
#include <cstdint>

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace mlaan_fast::ema::launch {

using Stream = CUstream_st*;

enum class LiveType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kThreads = 256;
constexpr int kVec = 4;     // elements per vector access: 16 bytes of fp32 shadow
constexpr int kUnroll = 4;  // independent vector accesses in flight per thread
// Elements one block updates: the chunk of the multi-tensor table.
constexpr int64_t kChunk = int64_t(kThreads) * kVec * kUnroll;

// One (shadow, live) pair; shipped to the device as raw bytes.
struct Entry {
  float* shadow;
  const void* live;
  int64_t numel;
  LiveType live_type;
  int32_t aligned;  // both pointers allow 16-byte shadow / kVec-element live vector accesses
};
static_assert(sizeof(Entry) == 32, "Entry is shipped as raw bytes");

struct ChunkRef {
  int32_t tensor;
  int32_t chunk;
};

// shadow <- shadow + w * (live - shadow) in one launch of `chunks_count` blocks: block b updates
// chunk chunks[b].chunk of entries[chunks[b].tensor] (both in device memory), or, when chunks is
// null, chunk b of `single` (no table at all).
struct Update {
  const Entry* entries;
  const ChunkRef* chunks;
  Entry single;
  int64_t chunks_count;
  float w;  // 1 - decay
};
int update(const Update& a, Stream stream);

}  // namespace mlaan_fast::ema::launch
