// Host side of the multi-tensor EMA update (shadow <- decay * shadow + (1 - decay) * live): the
// kernels that walk a multi-tensor table of (fp32 shadow, fp32/bf16/fp16 live) spans. The operator
// itself, its schema and its guards are in ema_ops.cpp.
#pragma once
#include <c10/core/Device.h>

#include "common/multi_tensor.h"

namespace mlaan_fast::ema {

// CPU kernel (ema_cpu.cpp): every span of the table, threads over the global index space.
void update_cpu(const multi_tensor::Table& table, double decay);

// CUDA host half (ema_cuda.cpp): one launch of kernels/ema.cu for the whole table on `device`.
// Without CUDA in the build it raises (never reached: no CUDA kernel is registered).
void update_cuda(const multi_tensor::Table& table, c10::Device device, double decay);

}  // namespace mlaan_fast::ema
