// The multi-tensor engine shared by every op that updates a list of tensors in place from a second
// list (apex's multi_tensor_apply idea): the pairs become one table of spans over one global index
// space, which a CPU kernel walks by ranges and a CUDA launcher cuts into fixed-size chunks. An op
// supplies only the functor that updates one span.
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mlaan_fast::multi_tensor {

// One non-empty pair: `numel` elements of the (contiguous) target and of the source.
struct Span {
  void* target;
  const void* source;
  int64_t numel;
  at::ScalarType source_type;
};

struct Table {
  std::vector<Span> spans;
  // starts[k]: global index of spans[k]'s first element; starts.back(): the total.
  std::vector<int64_t> starts;
  // Contiguous copies of strided sources: alive as long as the table.
  std::vector<at::Tensor> copies;

  int64_t total() const { return starts.back(); }

  // Calls f(span, first, last) for the pieces of the global range [begin, end), in order;
  // first and last are element offsets inside the span.
  template <typename F>
  void for_each_piece(int64_t begin, int64_t end, F&& f) const {
    // The span holding `begin`: the last start <= begin.
    size_t k = std::upper_bound(starts.begin(), starts.end() - 1, begin) - starts.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, starts[k + 1]);
      f(spans[k], begin - starts[k], stop - starts[k]);
      begin = stop;
      ++k;
    }
  }

  // Number of chunks of `chunk` elements that cover every span (a span's last chunk may be short).
  int64_t chunk_count(int64_t chunk) const {
    int64_t n = 0;
    for (const Span& s : spans) n += (s.numel + chunk - 1) / chunk;
    return n;
  }

  // Writes {span index, chunk index within the span} for every chunk, in order, into out.
  template <typename ChunkRef>
  void write_chunks(int64_t chunk, ChunkRef* out) const {
    for (size_t k = 0; k < spans.size(); ++k) {
      const int64_t count = (spans[k].numel + chunk - 1) / chunk;
      for (int64_t c = 0; c < count; ++c) *out++ = {static_cast<int32_t>(k), static_cast<int32_t>(c)};
    }
  }
};

// The table of the pairs (targets[i], sources[i]); empty pairs are left out. Targets must be
// contiguous (the caller has checked that, and equal sizes); strided sources are copied.
Table build_table(at::TensorList targets, at::TensorList sources);

}  // namespace mlaan_fast::multi_tensor
