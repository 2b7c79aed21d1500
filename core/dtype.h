// Element types of registered tensors, their widths and names (safetensors spelling for I/O).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/status.h"

namespace memento {

// Values are stable: they are stored in catalogs and manifests.
enum class DType : int32_t {
  kInvalid = 0,
  kF64 = 1,
  kF32 = 2,
  kF16 = 3,
  kBF16 = 4,
  kF8E4M3 = 5,
  kF8E5M2 = 6,
  kI64 = 7,
  kI32 = 8,
  kI8 = 9,
  kU8 = 10,
  kBool = 11,
};

// Bytes per element; 0 for kInvalid or an out-of-range value.
size_t DTypeSize(DType t);
// "F32", "BF16", "F8_E4M3", ... (the safetensors names).
std::string_view DTypeName(DType t);
// Accepts the safetensors names and the lower-case PyTorch-like ones ("float32", "bf16", "fp8_e4m3").
Result<DType> ParseDType(std::string_view name);
// Checks that an integer read from a message or file names a known dtype.
Result<DType> DTypeFromInt(int64_t value);

}  // namespace memento
