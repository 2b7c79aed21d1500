// DType tables.
#include "core/dtype.h"

#include <algorithm>
#include <array>
#include <cctype>

namespace memento {
namespace {

struct DTypeInfo {
  DType type;
  size_t size;
  std::string_view name;
  std::array<std::string_view, 3> aliases;
};

constexpr std::array<DTypeInfo, 11> kInfos = {{
    {DType::kF64, 8, "F64", {"float64", "double", "fp64"}},
    {DType::kF32, 4, "F32", {"float32", "float", "fp32"}},
    {DType::kF16, 2, "F16", {"float16", "half", "fp16"}},
    {DType::kBF16, 2, "BF16", {"bfloat16", "bf16", ""}},
    {DType::kF8E4M3, 1, "F8_E4M3", {"float8_e4m3fn", "fp8_e4m3", "e4m3"}},
    {DType::kF8E5M2, 1, "F8_E5M2", {"float8_e5m2", "fp8_e5m2", "e5m2"}},
    {DType::kI64, 8, "I64", {"int64", "long", ""}},
    {DType::kI32, 4, "I32", {"int32", "int", ""}},
    {DType::kI8, 1, "I8", {"int8", "", ""}},
    {DType::kU8, 1, "U8", {"uint8", "byte", ""}},
    {DType::kBool, 1, "BOOL", {"bool", "", ""}},
}};

const DTypeInfo* Find(DType t) {
  for (const auto& info : kInfos) {
    if (info.type == t) return &info;
  }
  return nullptr;
}

}  // namespace

size_t DTypeSize(DType t) {
  const DTypeInfo* info = Find(t);
  return info ? info->size : 0;
}

std::string_view DTypeName(DType t) {
  const DTypeInfo* info = Find(t);
  return info ? info->name : std::string_view("INVALID");
}

Result<DType> ParseDType(std::string_view name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const auto& info : kInfos) {
    std::string canon(info.name);
    std::transform(canon.begin(), canon.end(), canon.begin(), [](unsigned char c) { return std::tolower(c); });
    if (lower == canon) return info.type;
    for (std::string_view alias : info.aliases) {
      if (!alias.empty() && lower == alias) return info.type;
    }
  }
  return InvalidArgument("unknown dtype '" + std::string(name) + "'");
}

Result<DType> DTypeFromInt(int64_t value) {
  const DTypeInfo* info = Find(static_cast<DType>(value));
  if (value <= 0 || info == nullptr) return InvalidArgument("unknown dtype code " + std::to_string(value));
  return info->type;
}

}  // namespace memento
