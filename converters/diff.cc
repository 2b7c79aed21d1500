// memento diff (converters/diff.h): each side is opened as a set of named tensors read on demand.
#include "converters/diff.h"

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>

#include "converters/safetensors_export.h"
#include "converters/torch_zip.h"
#include "core/dtype.h"
#include "core/shard.h"
#include "proto/shard_convert.h"
#include "ucp_format/native_checkpoint.h"
#include "ucp_format/safetensors.h"
#include "ucp_format/universal.h"

namespace memento {
namespace {

std::string Join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

struct Entry {
  DType dtype = DType::kInvalid;
  std::vector<int64_t> shape;
  std::function<Result<std::vector<uint8_t>>()> read;
};

// The tensors of a committed native checkpoint, by their names in it (with the default state
// naming, "<param>" and "<param>.<state>": the names of its universal form), at their logical
// shapes (vocab padding cut), each consolidated from every rank's pieces by box intersection
// (LoadRankResharded onto one rank that holds whole tensors), every byte CRC-checked. Reads come
// in name order (DiffCheckpoints' order), so they are batched: one load fills the next tensors of
// up to kBatchBytes (a larger tensor alone) into one buffer, kept until a tensor outside it is read.
class NativeTensors {
 public:
  struct Info {
    DType dtype = DType::kInvalid;
    std::vector<int64_t> shape;  // logical
  };
  static constexpr uint64_t kBatchBytes = uint64_t{256} << 20;

  // Reads the manifest and every rank's metadata; FailedPrecondition (naming `dir` and the tensor)
  // when a tensor's layout metadata is partial, as `memento convert` would without a pattern spec.
  static Result<std::shared_ptr<NativeTensors>> Open(FileSystem* fs, const std::string& dir) {
    auto n = std::make_shared<NativeTensors>();
    n->fs_ = fs;
    n->dir_ = dir;
    MEMENTO_ASSIGN_OR_RETURN(proto::Manifest m, ReadManifest(fs, dir));
    for (const proto::ManifestRank& r : m.ranks()) {
      MEMENTO_ASSIGN_OR_RETURN(proto::RankMetadata meta, ReadRankMetadata(fs, dir, m, r.rank()));
      for (const proto::PersistedTensor& t : meta.tensors()) {
        MEMENTO_ASSIGN_OR_RETURN(DType dtype, DTypeFromInt(t.dtype()));
        const auto& spec = t.spec();
        std::vector<int64_t> shape(spec.original_shape().begin(), spec.original_shape().end());
        if (shape.empty()) shape.assign(spec.global_shape().begin(), spec.global_shape().end());
        n->tensors_.emplace(t.name(), Info{dtype, std::move(shape)});
      }
    }
    // Loading nothing checks that every tensor's metadata is complete.
    proto::RankRecord none;
    Status st = LoadRankResharded(fs, dir, none, nullptr);
    if (!st.ok()) return st.WithContext(dir + " (a native checkpoint)");
    return n;
  }

  const std::map<std::string, Info>& tensors() const { return tensors_; }

  Result<std::vector<uint8_t>> Read(const std::string& name) {
    auto at = batch_.find(name);
    if (at == batch_.end()) {
      MEMENTO_RETURN_IF_ERROR(LoadBatch(name));
      at = batch_.find(name);
    }
    const uint8_t* p = slot_.data() + at->second.first;
    return std::vector<uint8_t>(p, p + at->second.second);
  }

 private:
  // Loads `first` and the tensors after it in name order, up to kBatchBytes, into slot_.
  Status LoadBatch(const std::string& first) {
    batch_.clear();
    slot_.clear();
    proto::RankRecord layout;
    layout.set_rank(0);
    layout.set_world_size(1);
    uint64_t offset = 0;
    for (auto it = tensors_.find(first); it != tensors_.end(); ++it) {
      const uint64_t bytes = static_cast<uint64_t>(NumElements(it->second.shape)) * DTypeSize(it->second.dtype);
      if (layout.tensors_size() > 0 && offset + bytes > kBatchBytes) break;
      proto::TensorRecord* t = layout.add_tensors();
      t->set_name(it->first);
      t->set_dtype(static_cast<int32_t>(it->second.dtype));
      ToProto(WholeTensor(it->second.shape), t->mutable_spec());
      t->set_slot_offset(offset);
      t->set_bytes(bytes);
      offset += (bytes + 63) / 64 * 64;
    }
    if (layout.tensors_size() == 0) return NotFound(dir_ + ": no tensor '" + first + "'");
    layout.set_slot_bytes(offset);
    slot_.shrink_to_fit();
    slot_.resize(static_cast<size_t>(offset));
    MEMENTO_RETURN_IF_ERROR(LoadRankResharded(fs_, dir_, layout, slot_.data()));
    for (const proto::TensorRecord& t : layout.tensors()) batch_[t.name()] = {t.slot_offset(), t.bytes()};
    return Status::Ok();
  }

  FileSystem* fs_ = nullptr;
  std::string dir_;
  std::map<std::string, Info> tensors_;
  std::vector<uint8_t> slot_;                                   // the loaded batch
  std::map<std::string, std::pair<uint64_t, uint64_t>> batch_;  // its tensors: offset, bytes
};

// The open files behind a tensor set (kept alive while its readers run).
struct TensorSet {
  std::map<std::string, Entry> tensors;
  std::vector<std::shared_ptr<TorchFile>> torch_files;
  std::vector<std::shared_ptr<SafetensorsFile>> st_files;
  std::shared_ptr<NativeTensors> native;
  proto::UniversalManifest manifest;
  // Containers of torch files already walked: shared ones (pickle memo) are walked once.
  std::map<const PickleValue*, bool> walked;
};

Status AddTorchTensors(TensorSet* set, const std::shared_ptr<TorchFile>& f, const PickleValue& v, const std::string& prefix, int depth) {
  if (depth > 16) return Status::Ok();
  if (v.kind != PickleValue::Kind::kTensor && !set->walked.emplace(&v, true).second) return Status::Ok();
  if (v.kind == PickleValue::Kind::kTensor) {
    TorchFile* file = f.get();
    const TorchTensorRef ref = v.tensor;
    set->tensors[prefix] = {ref.dtype, ref.size, [file, ref]() { return file->ReadTensor(ref); }};
  } else if (v.kind == PickleValue::Kind::kDict) {
    for (const auto& [k, x] : v.entries) {
      std::string key = k->kind == PickleValue::Kind::kString ? k->s : k->kind == PickleValue::Kind::kInt ? std::to_string(k->i) : "";
      if (key.empty()) continue;
      MEMENTO_RETURN_IF_ERROR(AddTorchTensors(set, f, *x, prefix.empty() ? key : prefix + "." + key, depth + 1));
    }
  } else if (v.kind == PickleValue::Kind::kList || v.kind == PickleValue::Kind::kTuple) {
    for (size_t i = 0; i < v.items.size(); ++i) {
      MEMENTO_RETURN_IF_ERROR(AddTorchTensors(set, f, *v.items[i], prefix.empty() ? std::to_string(i) : prefix + "." + std::to_string(i), depth + 1));
    }
  }
  return Status::Ok();
}

Status AddSafetensors(FileSystem* fs, TensorSet* set, const std::string& path) {
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::Open(fs, path));
  std::shared_ptr<SafetensorsFile> sf(std::move(f));
  set->st_files.push_back(sf);
  for (const SafetensorsEntry& e : sf->entries()) {
    const std::string key = e.key;
    SafetensorsFile* file = sf.get();
    set->tensors[key] = {e.dtype, e.shape, [file, key]() { return file->Read(key); }};
  }
  return Status::Ok();
}

Result<std::unique_ptr<TensorSet>> Open(FileSystem* fs, const std::string& path) {
  auto set = std::make_unique<TensorSet>();
  if (fs->Exists(Join(path, kUniversalManifestName))) {
    MEMENTO_ASSIGN_OR_RETURN(set->manifest, ReadUniversalManifest(fs, path));
    const proto::UniversalManifest* m = &set->manifest;
    for (const proto::UniversalParam& p : m->params()) {
      for (int i = 0; i < p.states_size(); ++i) {
        const proto::UniversalTensor& t = p.states(i);
        const std::string name = i == 0 ? p.name() : p.name() + "." + t.state();
        MEMENTO_ASSIGN_OR_RETURN(DType dt, DTypeFromInt(t.dtype()));
        const std::string param = p.name(), state = t.state();
        set->tensors[name] = {dt, {t.shape().begin(), t.shape().end()},
                              [fs, path, m, param, state]() { return ReadUniversalTensor(fs, path, *m, param, state); }};
      }
    }
    return set;
  }
  if (fs->Exists(Join(path, "zero"))) {  // DeepSpeed universal layout
    MEMENTO_ASSIGN_OR_RETURN(std::vector<std::string> params, fs->ListDir(Join(path, "zero")));
    for (const std::string& p : params) {
      Result<std::vector<std::string>> files = fs->ListDir(Join(Join(path, "zero"), p));
      if (!files.ok()) continue;  // optimizer_state.pt
      for (const std::string& file : *files) {
        if (file.size() < 4 || file.substr(file.size() - 3) != ".pt") continue;
        const std::string state = file.substr(0, file.size() - 3);
        MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<TorchFile> tf, TorchFile::Open(fs, Join(Join(Join(path, "zero"), p), file)));
        std::shared_ptr<TorchFile> f(std::move(tf));
        set->torch_files.push_back(f);
        const PickleValue* v = f->root().kind == PickleValue::Kind::kTensor ? &f->root() : f->root().Get("param");
        if (v == nullptr || v->kind != PickleValue::Kind::kTensor) continue;
        MEMENTO_RETURN_IF_ERROR(AddTorchTensors(set.get(), f, *v, state == "fp32" ? p : p + "." + state, 0));
      }
    }
    return set;
  }
  if (fs->Exists(Join(path, "manifest"))) {  // a native checkpoint
    MEMENTO_ASSIGN_OR_RETURN(set->native, NativeTensors::Open(fs, path));
    NativeTensors* native = set->native.get();
    for (const auto& [name, info] : native->tensors()) {
      set->tensors[name] = {info.dtype, info.shape, [native, name = name]() { return native->Read(name); }};
    }
    return set;
  }
  Result<std::vector<std::string>> names = fs->ListDir(path);
  if (names.ok()) {
    for (const std::string& n : *names) {
      if (n.size() > 12 && n.substr(n.size() - 12) == ".safetensors") MEMENTO_RETURN_IF_ERROR(AddSafetensors(fs, set.get(), Join(path, n)));
    }
    if (set->st_files.empty()) {
      return InvalidArgument(path + ": not a checkpoint memento can compare (universal, DeepSpeed universal, safetensors, torch file)");
    }
    return set;
  }
  if (!fs->Exists(path)) return NotFound(path + ": no such file or directory");
  if (path.size() > 12 && path.substr(path.size() - 12) == ".safetensors") {
    MEMENTO_RETURN_IF_ERROR(AddSafetensors(fs, set.get(), path));
    return set;
  }
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<TorchFile> tf, TorchFile::Open(fs, path));
  std::shared_ptr<TorchFile> f(std::move(tf));
  set->torch_files.push_back(f);
  MEMENTO_RETURN_IF_ERROR(AddTorchTensors(set.get(), f, f->root(), "", 0));
  return set;
}

Result<std::vector<double>> AsDoubles(const std::string& name, DType dt, const std::vector<uint8_t>& bytes) {
  const size_t n = bytes.size() / std::max<size_t>(DTypeSize(dt), 1);
  std::vector<double> out(n);
  switch (dt) {
    case DType::kF64: case DType::kF32: case DType::kBF16: case DType::kF16: {
      MEMENTO_ASSIGN_OR_RETURN(std::vector<uint8_t> d, CastElements(dt, DType::kF64, bytes.data(), n));
      std::memcpy(out.data(), d.data(), n * 8);
      return out;
    }
    case DType::kI64: for (size_t i = 0; i < n; ++i) { int64_t x; std::memcpy(&x, &bytes[i * 8], 8); out[i] = static_cast<double>(x); } return out;
    case DType::kI32: for (size_t i = 0; i < n; ++i) { int32_t x; std::memcpy(&x, &bytes[i * 4], 4); out[i] = x; } return out;
    case DType::kI8: for (size_t i = 0; i < n; ++i) out[i] = static_cast<int8_t>(bytes[i]); return out;
    case DType::kU8: case DType::kBool: for (size_t i = 0; i < n; ++i) out[i] = bytes[i]; return out;
    default: return InvalidArgument("tensor '" + name + "': cannot compare dtype " + std::string(DTypeName(dt)));
  }
}

}  // namespace

Result<DiffReport> DiffCheckpoints(FileSystem* fs, const std::string& a, const std::string& b, const DiffOptions& options) {
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<TensorSet> sa, Open(fs, a));
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<TensorSet> sb, Open(fs, b));
  DiffReport report;
  std::map<std::string, int> names;
  for (const auto& [n, e] : sa->tensors) names[n] |= 1;
  for (const auto& [n, e] : sb->tensors) names[n] |= 2;
  for (const auto& [name, where] : names) {
    TensorDiff d;
    d.name = name;
    if (where != 3) {
      d.what = where == 1 ? "only in A" : "only in B";
      (where == 1 ? d.shape_a : d.shape_b) = (where == 1 ? sa : sb)->tensors[name].shape;
      ++report.differing;
      report.tensors.push_back(std::move(d));
      continue;
    }
    const Entry& ea = sa->tensors[name];
    const Entry& eb = sb->tensors[name];
    d.shape_a = ea.shape;
    d.shape_b = eb.shape;
    int64_t na = 1, nb = 1;
    for (int64_t x : ea.shape) na *= x;
    for (int64_t x : eb.shape) nb *= x;
    // A 0-d and a 1-element tensor compare as the same shape.
    if (ea.shape != eb.shape && !(na == 1 && nb == 1 && ea.shape.size() <= 1 && eb.shape.size() <= 1)) {
      d.what = "shape";
      ++report.differing;
      report.tensors.push_back(std::move(d));
      continue;
    }
    MEMENTO_ASSIGN_OR_RETURN(std::vector<uint8_t> ba, ea.read());
    MEMENTO_ASSIGN_OR_RETURN(std::vector<uint8_t> bb, eb.read());
    MEMENTO_ASSIGN_OR_RETURN(std::vector<double> va, AsDoubles(name, ea.dtype, ba));
    MEMENTO_ASSIGN_OR_RETURN(std::vector<double> vb, AsDoubles(name, eb.dtype, bb));
    bool differs = va.size() != vb.size();
    for (size_t i = 0; i < va.size() && i < vb.size(); ++i) {
      const double x = va[i], y = vb[i];
      if (std::isnan(x) || std::isnan(y)) {
        if (!(std::isnan(x) && std::isnan(y))) {
          differs = true;
          d.max_abs = d.max_rel = INFINITY;
        }
        continue;
      }
      const double diff = x == y ? 0.0 : std::fabs(x - y);
      d.max_abs = std::max(d.max_abs, diff);
      if (diff > 0) d.max_rel = std::max(d.max_rel, y == 0 ? INFINITY : diff / std::fabs(y));
      if (diff > options.atol + options.rtol * std::fabs(y)) differs = true;
    }
    d.what = differs ? "differs" : "equal";
    if (differs) ++report.differing;
    report.tensors.push_back(std::move(d));
  }
  return report;
}

}  // namespace memento
