#include "common/multi_tensor.h"

namespace mlaan_fast::multi_tensor {

Table build_table(at::TensorList targets, at::TensorList sources) {
  Table table;
  table.spans.reserve(targets.size());
  table.starts.reserve(targets.size() + 1);
  int64_t total = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    const int64_t n = targets[i].numel();
    if (n == 0) continue;
    const at::Tensor* source = &sources[i];
    if (!source->is_contiguous()) {
      table.copies.push_back(source->contiguous());
      source = &table.copies.back();
    }
    table.spans.push_back({targets[i].data_ptr(), source->const_data_ptr(), n, source->scalar_type()});
    table.starts.push_back(total);
    total += n;
  }
  table.starts.push_back(total);
  return table;
}

}  // namespace mlaan_fast::multi_tensor
