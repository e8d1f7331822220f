// Input checks shared by the C++ operators. Each raises a Python ValueError/TypeError with a
// message naming the operator, the offending argument (and list index) and the problem.
#pragma once
#include <c10/util/Exception.h>

// ValueError: wrong shape, length, range or device.
#define MLAAN_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
// TypeError: wrong dtype or kind of argument.
#define MLAAN_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)
