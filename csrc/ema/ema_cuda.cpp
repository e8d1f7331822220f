// CUDA host half of the multi-tensor EMA update: turns the multi-tensor table into the launch
// table of kernels/ema.cu (entries plus one (tensor, chunk) pair per block), ships it to the device
// with one async copy from pinned memory, and launches once (g++-compiled; nothing in the .cu throws).
#include "ema/ema.h"

#ifdef MLAAN_FAST_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <limits>
#include <vector>

#include "ema_launch.h"
#endif

namespace mlaan_fast::ema {

#ifdef MLAAN_FAST_WITH_CUDA

namespace {

launch::Entry entry_of(const multi_tensor::Span& span) {
  const auto type = span.source_type == at::kFloat      ? launch::LiveType::kFloat32
                    : span.source_type == at::kBFloat16 ? launch::LiveType::kBFloat16
                                                        : launch::LiveType::kFloat16;
  const size_t live_bytes = type == launch::LiveType::kFloat32 ? 4 : 2;
  const bool aligned = reinterpret_cast<uintptr_t>(span.target) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(span.source) % (launch::kVec * live_bytes) == 0;
  return {static_cast<float*>(span.target), span.source, span.numel, type, aligned ? 1 : 0};
}

}  // namespace

void update_cuda(const multi_tensor::Table& table, c10::Device device, double decay) {
  const c10::cuda::CUDAGuard guard(device);
  launch::Update a{};
  a.w = static_cast<float>(1.0 - decay);
  a.chunks_count = table.chunk_count(launch::kChunk);
  TORCH_CHECK(a.chunks_count <= std::numeric_limits<int32_t>::max(), "ema_update_: ", a.chunks_count,
              " chunks exceed the grid limit; split the list");
  const launch::Stream stream = c10::cuda::getCurrentCUDAStream().stream();
  if (table.spans.size() == 1) {
    a.single = entry_of(table.spans[0]);
    C10_CUDA_CHECK(static_cast<cudaError_t>(launch::update(a, stream)));
    return;
  }
  // One pinned staging buffer from torch's caching host allocator: a non_blocking copy_ records
  // an event on the stream, so the block is not reused before the copy has read it.
  const int64_t entry_bytes = static_cast<int64_t>(table.spans.size() * sizeof(launch::Entry));
  const int64_t bytes = entry_bytes + a.chunks_count * static_cast<int64_t>(sizeof(launch::ChunkRef));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* base = static_cast<uint8_t*>(host.data_ptr());
  auto* entries = reinterpret_cast<launch::Entry*>(base);
  for (size_t k = 0; k < table.spans.size(); ++k) entries[k] = entry_of(table.spans[k]);
  table.write_chunks(launch::kChunk, reinterpret_cast<launch::ChunkRef*>(base + entry_bytes));
  at::Tensor on_device = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  on_device.copy_(host, /*non_blocking=*/true);
  const auto* device_base = static_cast<const uint8_t*>(on_device.const_data_ptr());
  a.entries = reinterpret_cast<const launch::Entry*>(device_base);
  a.chunks = reinterpret_cast<const launch::ChunkRef*>(device_base + entry_bytes);
  C10_CUDA_CHECK(static_cast<cudaError_t>(launch::update(a, stream)));
}

#else  // built without CUDA: never reached, no CUDA kernel is registered

void update_cuda(const multi_tensor::Table&, c10::Device, double) {
  TORCH_CHECK(false, "mlaan_fast._C was built without CUDA kernels");
}

#endif

}  // namespace mlaan_fast::ema
