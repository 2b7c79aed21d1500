// safetensors export and import (converters/safetensors_export.h).
#include "converters/safetensors_export.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>

#include "converters/json_writer.h"
#include "converters/native_staging.h"
#include "core/shard.h"
#include "ucp_format/safetensors.h"

namespace memento {
namespace {

std::string Join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}
std::string Basename(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}
std::string Parent(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | (static_cast<uint32_t>(exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t F32ToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00);  // overflow (rounds to inf) or inf
  if (abs < 0x38800000u) {  // subnormal half (or zero): round |f| * 2^24 to nearest even
    float a;
    std::memcpy(&a, &abs, 4);
    const float scaled = a * 16777216.0f;
    const auto m = static_cast<uint32_t>(std::nearbyint(scaled));
    return static_cast<uint16_t>(sign | m);
  }
  const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

uint16_t F32ToBF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

bool IsFloat(DType t) { return t == DType::kF64 || t == DType::kF32 || t == DType::kBF16 || t == DType::kF16; }

struct Planned {
  std::string name;
  const proto::UniversalTensor* tensor;
  DType out;
  uint64_t bytes;
};

Result<SafetensorsExportSummary> Export(FileSystem* fs, const std::string& ucp, const std::string& out_dir,
                                        const std::string& tmp, const SafetensorsExportOptions& options) {
  MEMENTO_ASSIGN_OR_RETURN(proto::UniversalManifest m, ReadUniversalManifest(fs, ucp));
  std::vector<Planned> plan;
  for (const proto::UniversalParam& p : m.params()) {
    for (const proto::UniversalTensor& t : p.states()) {
      if (t.state() != options.state) continue;
      MEMENTO_ASSIGN_OR_RETURN(DType dt, DTypeFromInt(t.dtype()));
      const DType out = options.dtype != DType::kInvalid && IsFloat(dt) ? options.dtype : dt;
      uint64_t numel = 1;
      for (int64_t d : t.shape()) numel *= static_cast<uint64_t>(d);
      plan.push_back({p.name(), &t, out, numel * DTypeSize(out)});
    }
  }
  if (plan.empty()) return NotFound(ucp + ": no parameter has a '" + options.state + "' state");
  // Files: greedy, in name order.
  std::vector<std::vector<size_t>> files(1);
  uint64_t in_file = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    if (options.shard_bytes > 0 && !files.back().empty() && in_file + plan[i].bytes > options.shard_bytes) {
      files.emplace_back();
      in_file = 0;
    }
    files.back().push_back(i);
    in_file += plan[i].bytes;
  }
  SafetensorsExportSummary sum;
  sum.out_dir = out_dir;
  MEMENTO_RETURN_IF_ERROR(fs->CreateDirs(tmp));
  std::map<std::string, std::string> weight_map;
  for (size_t f = 0; f < files.size(); ++f) {
    std::string name = "model.safetensors";
    if (options.shard_bytes > 0) {
      char buf[64];
      std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", f + 1, files.size());
      name = buf;
    }
    SafetensorsHeader header;
    header.SetMetadata("format", "pt");
    for (size_t i : files[f]) {
      const Planned& p = plan[i];
      MEMENTO_RETURN_IF_ERROR(header.Add(p.name, p.out, std::vector<int64_t>(p.tensor->shape().begin(), p.tensor->shape().end())));
      weight_map[p.name] = name;
    }
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> w, fs->NewWritableFile(Join(tmp, name), WriteOptions{.direct_io = false}));
    const std::string h = header.Serialize();
    MEMENTO_RETURN_IF_ERROR(w->Append(h.data(), h.size()));
    for (size_t i : files[f]) {
      const Planned& p = plan[i];
      MEMENTO_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadUniversalTensor(fs, ucp, m, p.name, options.state));
      MEMENTO_ASSIGN_OR_RETURN(DType dt, DTypeFromInt(p.tensor->dtype()));
      if (dt != p.out) {
        MEMENTO_ASSIGN_OR_RETURN(bytes, CastElements(dt, p.out, bytes.data(), bytes.size() / DTypeSize(dt)));
      }
      MEMENTO_RETURN_IF_ERROR(w->Append(bytes.data(), bytes.size()));
      sum.bytes += bytes.size();
      ++sum.tensors;
    }
    MEMENTO_RETURN_IF_ERROR(w->Close());
    sum.files.push_back(name);
  }
  if (options.shard_bytes > 0) {
    JsonWriter j;
    j.BeginObject().Key("metadata").BeginObject().Key("total_size").Uint(sum.bytes).EndObject();
    j.Key("weight_map").BeginObject();
    for (const auto& [k, v] : weight_map) j.Key(k).String(v);
    j.EndObject().EndObject();
    MEMENTO_RETURN_IF_ERROR(WriteFileAtomically(fs, Join(tmp, "model.safetensors.index.json"), j.str() + "\n"));
    sum.files.push_back("model.safetensors.index.json");
  }
  return sum;
}

}  // namespace

Result<std::vector<uint8_t>> CastElements(DType from, DType to, const uint8_t* src, size_t n) {
  if (!IsFloat(from) || !IsFloat(to)) {
    return InvalidArgument("cannot cast " + std::string(DTypeName(from)) + " to " + std::string(DTypeName(to)));
  }
  std::vector<uint8_t> out(n * DTypeSize(to));
  for (size_t i = 0; i < n; ++i) {
    float f = 0;
    double d = 0;
    switch (from) {
      case DType::kF64: std::memcpy(&d, src + i * 8, 8); f = static_cast<float>(d); break;
      case DType::kF32: std::memcpy(&f, src + i * 4, 4); d = f; break;
      case DType::kBF16: {
        uint32_t bits = static_cast<uint32_t>(src[i * 2] | (src[i * 2 + 1] << 8)) << 16;
        std::memcpy(&f, &bits, 4);
        d = f;
        break;
      }
      default: f = F16ToF32(static_cast<uint16_t>(src[i * 2] | (src[i * 2 + 1] << 8))); d = f; break;
    }
    switch (to) {
      case DType::kF64: std::memcpy(out.data() + i * 8, &d, 8); break;
      case DType::kF32: std::memcpy(out.data() + i * 4, &f, 4); break;
      case DType::kBF16: { const uint16_t h = F32ToBF16(f); std::memcpy(out.data() + i * 2, &h, 2); break; }
      default: { const uint16_t h = F32ToF16(f); std::memcpy(out.data() + i * 2, &h, 2); break; }
    }
  }
  return out;
}

Result<SafetensorsExportSummary> ExportSafetensors(FileSystem* fs, const std::string& src, const std::string& out_dir,
                                                   const SafetensorsExportOptions& options) {
  if (options.dtype != DType::kInvalid && options.dtype != DType::kBF16 && options.dtype != DType::kF16 && options.dtype != DType::kF32) {
    return InvalidArgument("safetensors export casts to BF16, F16 or F32, not " + std::string(DTypeName(options.dtype)));
  }
  if (fs->Exists(out_dir)) return AlreadyExists(out_dir + " already exists; the safetensors export needs a new path");
  const std::string parent = Parent(out_dir);
  const std::string tag = "." + Basename(out_dir) + ".tmp-" + std::to_string(::getpid());
  const std::string tmp = Join(parent, tag);
  std::string ucp = src;
  std::string tmp_ucp;
  if (!fs->Exists(Join(src, kUniversalManifestName))) {
    if (!fs->Exists(Join(src, "manifest"))) return NotFound(src + ": neither a universal (manifest.pb) nor a native (manifest) checkpoint");
    tmp_ucp = Join(parent, tag + "-ucp");
    fs->RemoveAll(tmp_ucp).IgnoreError();
    Result<ConvertSummary> c = ConvertNativeToUniversal(fs, src, tmp_ucp, ConvertOptions{.write = {.direct_io = false}});
    if (!c.ok()) return c.status();
    ucp = tmp_ucp;
  }
  fs->RemoveAll(tmp).IgnoreError();
  Result<SafetensorsExportSummary> r = Export(fs, ucp, out_dir, tmp, options);
  Status st = r.ok() ? fs->SyncDir(tmp) : r.status();
  if (st.ok()) st = fs->Rename(tmp, out_dir);
  if (st.ok()) st = fs->SyncDir(parent);
  if (!st.ok()) fs->RemoveAll(tmp).IgnoreError();
  if (!tmp_ucp.empty()) fs->RemoveAll(tmp_ucp).IgnoreError();
  if (!st.ok()) return st;
  return r;
}

Result<ConvertSummary> ImportSafetensors(FileSystem* fs, const std::string& src, const std::string& out_dir,
                                         const ConvertOptions& options) {
  if (fs->Exists(out_dir)) return AlreadyExists(out_dir + " already exists; the universal checkpoint needs a new path");
  std::vector<std::string> paths;
  Result<std::vector<std::string>> names = fs->ListDir(src);
  if (names.ok()) {
    for (const std::string& n : *names) {
      if (n.size() > 12 && n.substr(n.size() - 12) == ".safetensors") paths.push_back(Join(src, n));
    }
    if (paths.empty()) return NotFound(src + ": no *.safetensors files");
  } else if (fs->Exists(src)) {
    paths.push_back(src);
  } else {
    return NotFound(src + ": no such file or directory");
  }
  const std::string staging = Join(Parent(out_dir), "." + Basename(out_dir) + ".safetensors-import-" + std::to_string(::getpid()));
  fs->RemoveAll(staging).IgnoreError();
  auto run = [&]() -> Result<ConvertSummary> {
    NativeStaging sink(fs, staging, 0);
    std::map<std::string, std::string> seen;
    for (const std::string& path : paths) {
      MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::Open(fs, path));
      for (const SafetensorsEntry& e : f->entries()) {
        auto [it, inserted] = seen.emplace(e.key, path);
        if (!inserted) return InvalidArgument("tensor '" + e.key + "' is in both " + it->second + " and " + path);
        MEMENTO_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, f->Read(e.key));
        MEMENTO_RETURN_IF_ERROR(sink.AddTensor(e.key, e.dtype, e.shape, std::move(bytes)));
      }
    }
    MEMENTO_RETURN_IF_ERROR(sink.Finish());
    return ConvertNativeToUniversal(fs, staging, out_dir, options);
  };
  Result<ConvertSummary> r = run();
  fs->RemoveAll(staging).IgnoreError();
  return r;
}

}  // namespace memento
