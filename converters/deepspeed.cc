// DeepSpeed import and export (converters/deepspeed.h). Import: per pipeline stage and TP rank
// (an "mp rank"), each parameter's fragments are gathered from the DP ranks' optimizer files
// (param_slice_mappings for ZeRO-1/2, ceil(numel / dp) pieces for ZeRO-3), the TP slices are
// merged by the universal_checkpoint_info patterns (Python re.match: anchored at the start), and
// the consolidated tensors go through a temporary native checkpoint (whole-tensor boxes, a few
// parameters per "rank") into the universal writer, which CRCs and commits them.
#include "converters/deepspeed.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <future>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <regex>

#include "converters/native_staging.h"
#include "converters/torch_pickle.h"
#include "converters/torch_zip.h"
#include "core/crc.h"
#include "core/dtype.h"
#include "core/shard.h"
#include "proto/shard_convert.h"
#include "ucp_format/native_checkpoint.h"
#include "ucp_format/safetensors.h"

namespace memento {
namespace {

using K = PickleValue::Kind;
constexpr const char* kInfoBlob = "deepspeed/info.pkl";
constexpr const char* kModelStatesPrefix = "deepspeed/";

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
std::string TwoDigits(int v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%02d", v);
  return buf;
}

// A value of a DeepSpeed file, found by path; errors name the file and the key path.
class Doc {
 public:
  Doc(std::string file, const PickleValue* v, std::string where = "") : file_(std::move(file)), v_(v), where_(std::move(where)) {}
  Result<Doc> Key(const std::string& key) const {
    if (v_->kind != K::kDict && v_->kind != K::kObject) return Bad("is " + v_->TypeName() + ", not a dict");
    const PickleValue* c = v_->Get(key);
    if (c == nullptr) return InvalidArgument(file_ + ": no key '" + key + "'" + (where_.empty() ? "" : " in " + where_) + ": not a DeepSpeed checkpoint file");
    return Doc(file_, c, where_.empty() ? key : where_ + "." + key);
  }
  const PickleValue* Find(const std::string& key) const { return v_->Get(key); }
  Result<Doc> At(size_t i) const {
    if (v_->kind == K::kDict) {
      for (const auto& [k, x] : v_->entries) {
        if (k->kind == K::kInt && k->i == static_cast<int64_t>(i)) return Doc(file_, x.get(), where_ + "[" + std::to_string(i) + "]");
      }
      return Bad("has no entry " + std::to_string(i));
    }
    if (v_->kind != K::kList && v_->kind != K::kTuple) return Bad("is " + v_->TypeName() + ", not a list");
    if (i >= v_->items.size()) return Bad("has " + std::to_string(v_->items.size()) + " entries, not " + std::to_string(i + 1));
    return Doc(file_, v_->items[i].get(), where_ + "[" + std::to_string(i) + "]");
  }
  size_t size() const { return v_->kind == K::kDict ? v_->entries.size() : v_->items.size(); }
  Result<int64_t> Int() const {
    if (v_->kind == K::kInt) return v_->i;
    if (v_->kind == K::kBool) return int64_t{v_->b};
    return Bad("is " + v_->TypeName() + ", not an int");
  }
  Result<const TorchTensorRef*> Tensor() const {
    if (v_->kind != K::kTensor) return Bad("is " + v_->TypeName() + ", not a tensor");
    return &v_->tensor;
  }
  Status Bad(const std::string& what) const { return InvalidArgument(file_ + ": " + (where_.empty() ? "the object" : where_) + " " + what); }
  const PickleValue* value() const { return v_; }

 private:
  std::string file_;
  const PickleValue* v_;
  std::string where_;
};

Result<std::vector<int64_t>> Shape(const Doc& d) {
  const PickleValue* v = d.value();
  if (v->kind != K::kTuple && v->kind != K::kList) return d.Bad("is " + v->TypeName() + ", not a shape");
  std::vector<int64_t> s;
  for (const auto& x : v->items) {
    if (x->kind != K::kInt || x->i < 0) return d.Bad("is not a shape of non-negative ints");
    s.push_back(x->i);
  }
  return s;
}

std::vector<std::string> Strings(const PickleValue* list) {
  std::vector<std::string> out;
  if (list == nullptr || (list->kind != K::kList && list->kind != K::kTuple)) return out;
  for (const auto& x : list->items) {
    if (x->kind == K::kString) out.push_back(x->s);
  }
  return out;
}

// A pattern list of universal_checkpoint_info, compiled, with whether each pattern matched.
struct PatternList {
  std::string key;
  std::vector<std::string> text;
  std::vector<std::regex> re;
  std::vector<bool> used;

  Status Compile(const std::string& file) {
    for (const std::string& t : text) {
      try {
        re.emplace_back(t, std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        return InvalidArgument(file + ": universal_checkpoint_info." + key + " pattern '" + t + "': " + e.what());
      }
    }
    used.assign(re.size(), false);
    return Status::Ok();
  }
  // Python re.match: anchored at the start only.
  bool Match(const std::string& name) {
    for (size_t i = 0; i < re.size(); ++i) {
      if (std::regex_search(name, re[i], std::regex_constants::match_continuous)) {
        used[i] = true;
        return true;
      }
    }
    return false;
  }
};

struct SubParams {
  PatternList patterns;
  std::vector<int64_t> sizes;  // along partition_dim
  int dim = 0;
};

struct MergeRules {
  PatternList vocab{"vocabulary_parameter_patterns"}, pipeline{"pipeline_replicated_parameter_patterns"},
      replicated{"tp_replicated_parameter_patterns"}, average{"parameter_to_average_patterns"},
      row{"parameter_with_row_parallelism_patterns"}, two_sub{"parameter_with_2_sub_params_cat_dim_0"};
  std::vector<SubParams> sub_params;
  int64_t original_vocab = 0;

  std::vector<PatternList*> lists() { return {&vocab, &pipeline, &replicated, &average, &row, &two_sub}; }
};

Result<MergeRules> ParseRules(const std::string& file, const PickleValue* uci) {
  MergeRules r;
  if (uci == nullptr || uci->kind != K::kDict) return r;  // no info: every parameter concatenates on dim 0
  for (PatternList* l : r.lists()) {
    l->text = Strings(uci->Get(l->key));
    MEMENTO_RETURN_IF_ERROR(l->Compile(file));
  }
  if (const PickleValue* v = uci->Get("original_vocab_size"); v != nullptr && v->kind == K::kInt) r.original_vocab = v->i;
  if (const PickleValue* subs = uci->Get("parameter_with_sub_params"); subs != nullptr && subs->kind == K::kList) {
    for (const auto& s : subs->items) {
      SubParams sp;
      sp.patterns.key = "parameter_with_sub_params";
      const PickleValue* pats = s->Field("patterns", 0);
      const PickleValue* shape = s->Field("shape", 1);
      const PickleValue* dim = s->Field("partition_dim", 2);
      if (pats == nullptr || shape == nullptr || dim == nullptr || dim->kind != K::kInt ||
          (shape->kind != K::kTuple && shape->kind != K::kList) || dim->i < 0 ||
          static_cast<size_t>(dim->i) >= shape->items.size()) {
        return InvalidArgument(file + ": universal_checkpoint_info.parameter_with_sub_params entry is " + s->TypeName() +
                               " without patterns, shape and partition_dim");
      }
      sp.patterns.text = Strings(pats);
      sp.dim = static_cast<int>(dim->i);
      const PickleValue* sizes = shape->items[static_cast<size_t>(sp.dim)].get();
      if (sizes->kind == K::kTuple || sizes->kind == K::kList) {
        for (const auto& x : sizes->items) sp.sizes.push_back(x->i);
      } else {
        sp.sizes.push_back(sizes->i);
      }
      MEMENTO_RETURN_IF_ERROR(sp.patterns.Compile(file));
      r.sub_params.push_back(std::move(sp));
    }
  }
  return r;
}

// A row-major F32 tensor in memory.
struct Dense {
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

Dense Concat(const std::vector<Dense>& parts, int dim) {
  Dense out;
  out.shape = parts[0].shape;
  out.shape[static_cast<size_t>(dim)] = 0;
  for (const Dense& p : parts) out.shape[static_cast<size_t>(dim)] += p.shape[static_cast<size_t>(dim)];
  int64_t outer = 1, inner = 4;
  for (int d = 0; d < dim; ++d) outer *= out.shape[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(dim) + 1; d < out.shape.size(); ++d) inner *= out.shape[d];
  out.bytes.reserve(static_cast<size_t>(NumElements(out.shape) * 4));
  for (int64_t o = 0; o < outer; ++o) {
    for (const Dense& p : parts) {
      const size_t n = static_cast<size_t>(p.shape[static_cast<size_t>(dim)] * inner);
      const uint8_t* src = p.bytes.data() + static_cast<size_t>(o) * n;
      out.bytes.insert(out.bytes.end(), src, src + n);
    }
  }
  return out;
}

std::vector<Dense> Split(const Dense& t, int dim, const std::vector<int64_t>& sizes) {
  std::vector<Dense> out(sizes.size());
  int64_t outer = 1, inner = 4;
  for (int d = 0; d < dim; ++d) outer *= t.shape[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(dim) + 1; d < t.shape.size(); ++d) inner *= t.shape[d];
  for (size_t i = 0; i < sizes.size(); ++i) {
    out[i].shape = t.shape;
    out[i].shape[static_cast<size_t>(dim)] = sizes[i];
  }
  size_t pos = 0;
  for (int64_t o = 0; o < outer; ++o) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      const size_t n = static_cast<size_t>(sizes[i] * inner);
      out[i].bytes.insert(out[i].bytes.end(), t.bytes.begin() + static_cast<std::ptrdiff_t>(pos),
                          t.bytes.begin() + static_cast<std::ptrdiff_t>(pos + n));
      pos += n;
    }
  }
  return out;
}

// How the TP slices of a parameter merge, and what DeepSpeed's universal files record about it.
struct MergeKind {
  enum { kConcat, kReplicated, kAverage, kSubParams, kTwoSub } kind = kConcat;
  int dim = 0;
  bool vocab = false;
  bool pipeline_replicated = false;
  const SubParams* sub = nullptr;
};

MergeKind Classify(MergeRules& rules, const std::string& name) {
  MergeKind k;
  k.vocab = rules.vocab.Match(name);
  k.pipeline_replicated = rules.pipeline.Match(name);
  if (rules.replicated.Match(name)) {
    k.kind = MergeKind::kReplicated;
  } else if (rules.average.Match(name)) {
    k.kind = MergeKind::kAverage;
  } else {
    for (SubParams& s : rules.sub_params) {
      if (s.patterns.Match(name)) {
        k.kind = MergeKind::kSubParams;
        k.sub = &s;
        k.dim = s.dim;
        return k;
      }
    }
    if (rules.two_sub.Match(name)) {
      k.kind = MergeKind::kTwoSub;
    } else if (rules.row.Match(name)) {
      k.dim = 1;
    }
  }
  return k;
}

Result<Dense> Merge(const std::string& name, const MergeKind& k, std::vector<Dense> slices, int64_t original_vocab) {
  const size_t tp = slices.size();
  for (const Dense& s : slices) {
    if (s.shape.size() != slices[0].shape.size()) return FailedPrecondition("parameter '" + name + "': TP slices of different ranks");
  }
  Dense out;
  switch (k.kind) {
    case MergeKind::kReplicated:
      out = std::move(slices[0]);
      break;
    case MergeKind::kAverage: {
      out = slices[0];
      const size_t n = out.bytes.size() / 4;
      std::vector<float> acc(n), x(n);
      std::memcpy(acc.data(), out.bytes.data(), n * 4);
      for (size_t r = 1; r < tp; ++r) {
        std::memcpy(x.data(), slices[r].bytes.data(), n * 4);
        for (size_t i = 0; i < n; ++i) acc[i] += x[i];
      }
      for (float& a : acc) a /= static_cast<float>(tp);
      std::memcpy(out.bytes.data(), acc.data(), n * 4);
      break;
    }
    case MergeKind::kSubParams:
    case MergeKind::kTwoSub: {
      const int dim = k.kind == MergeKind::kTwoSub ? 0 : k.dim;
      if (static_cast<size_t>(dim) >= slices[0].shape.size()) return FailedPrecondition("parameter '" + name + "': sub-parameter dim out of range");
      std::vector<int64_t> local;
      if (k.kind == MergeKind::kTwoSub) {
        const int64_t rows = slices[0].shape[0];
        if (rows % 2 != 0) return FailedPrecondition("parameter '" + name + "': TP slice of " + std::to_string(rows) + " rows does not hold 2 sub-parameters");
        local = {rows / 2, rows / 2};
      } else {
        int64_t sum = 0;
        for (int64_t s : k.sub->sizes) {
          if (s % static_cast<int64_t>(tp) != 0) {
            return FailedPrecondition("parameter '" + name + "': sub-parameter of " + std::to_string(s) + " rows does not split evenly over tp " +
                                      std::to_string(tp) + " (sub_param_shard_widths not supported)");
          }
          local.push_back(s / static_cast<int64_t>(tp));
          sum += s / static_cast<int64_t>(tp);
        }
        if (sum != slices[0].shape[static_cast<size_t>(dim)]) {
          return FailedPrecondition("parameter '" + name + "': TP slice has " + std::to_string(slices[0].shape[static_cast<size_t>(dim)]) +
                                    " rows on dim " + std::to_string(dim) + ", the sub-parameter shape says " + std::to_string(sum));
        }
      }
      std::vector<std::vector<Dense>> per_sub(local.size());
      for (const Dense& s : slices) {
        std::vector<Dense> pieces = Split(s, dim, local);
        for (size_t i = 0; i < pieces.size(); ++i) per_sub[i].push_back(std::move(pieces[i]));
      }
      std::vector<Dense> subs;
      for (auto& p : per_sub) subs.push_back(Concat(p, dim));
      out = Concat(subs, dim);
      break;
    }
    case MergeKind::kConcat:
      if (static_cast<size_t>(k.dim) >= slices[0].shape.size()) {
        if (tp == 1) {
          out = std::move(slices[0]);
          break;
        }
        return FailedPrecondition("parameter '" + name + "': cannot concatenate " + std::to_string(slices[0].shape.size()) + "-d slices on dim " + std::to_string(k.dim));
      }
      out = tp == 1 ? std::move(slices[0]) : Concat(slices, k.dim);
      break;
  }
  if (k.vocab && original_vocab > 0 && !out.shape.empty() && out.shape[0] > original_vocab) {
    const int64_t row = NumElements(out.shape) / out.shape[0] * 4;
    out.bytes.resize(static_cast<size_t>(original_vocab * row));
    out.shape[0] = original_vocab;
  }
  return out;
}

// A flat fp32 sequence held by one or more 1-d tensors of one file (sub-groups), read by range.
struct FlatSeq {
  TorchFile* file = nullptr;
  std::vector<TorchTensorRef> parts;

  Status Add(const Doc& d) {
    MEMENTO_ASSIGN_OR_RETURN(const TorchTensorRef* t, d.Tensor());
    if (t->size.size() != 1 || !t->contiguous()) return d.Bad("is not a flat 1-d tensor");
    if (t->dtype != DType::kF32) return d.Bad("is " + std::string(DTypeName(t->dtype)) + ", not F32");
    parts.push_back(*t);
    return Status::Ok();
  }
  int64_t numel() const {
    int64_t n = 0;
    for (const auto& p : parts) n += p.size[0];
    return n;
  }
  // Appends elements [start, start + n) to `out`.
  Status Read(int64_t start, int64_t n, std::vector<uint8_t>* out, const std::string& what) const {
    if (start < 0 || n < 0 || start + n > numel()) {
      return DataLoss(file->path() + ": " + what + ": elements " + std::to_string(start) + ".." + std::to_string(start + n) +
                      " outside the flat partition of " + std::to_string(numel()));
    }
    for (const TorchTensorRef& p : parts) {
      if (n == 0) break;
      if (start >= p.size[0]) {
        start -= p.size[0];
        continue;
      }
      TorchTensorRef sub = p;
      const int64_t take = std::min(n, p.size[0] - start);
      sub.storage_offset += start;
      sub.size = {take};
      const size_t at = out->size();
      out->resize(at + static_cast<size_t>(take) * 4);
      MEMENTO_RETURN_IF_ERROR(file->ReadTensorInto(sub, out->data() + at));
      n -= take;
      start = 0;
    }
    return Status::Ok();
  }
};

constexpr const char* kStates[3] = {"fp32", "exp_avg", "exp_avg_sq"};

// One DP rank's optimizer file of one mp rank, with its flat sequences per state.
struct OptimFile {
  std::unique_ptr<TorchFile> file;
  FlatSeq flat[3];                     // fp32, exp_avg, exp_avg_sq (ZeRO-1/2: per group, see groups)
  std::vector<std::array<FlatSeq, 3>> groups;
  std::vector<const PickleValue*> mappings;  // ZeRO-1/2: param_slice_mappings per group
  double step = 0;
  bool has_step = false;
};

Result<double> Scalar(TorchFile* f, const PickleValue* v) {
  if (v->kind == K::kInt) return static_cast<double>(v->i);
  if (v->kind == K::kFloat) return v->f;
  if (v->kind != K::kTensor || v->tensor.numel() != 1) return InvalidArgument(f->path() + ": step is " + v->TypeName());
  MEMENTO_ASSIGN_OR_RETURN(std::vector<uint8_t> b, f->ReadTensor(v->tensor));
  switch (v->tensor.dtype) {
    case DType::kF32: { float x; std::memcpy(&x, b.data(), 4); return static_cast<double>(x); }
    case DType::kF64: { double x; std::memcpy(&x, b.data(), 8); return x; }
    case DType::kI64: { int64_t x; std::memcpy(&x, b.data(), 8); return static_cast<double>(x); }
    case DType::kI32: { int32_t x; std::memcpy(&x, b.data(), 4); return static_cast<double>(x); }
    default: return InvalidArgument(f->path() + ": step of dtype " + std::string(DTypeName(v->tensor.dtype)));
  }
}

Result<OptimFile> OpenOptim(FileSystem* fs, const std::string& path, int stage) {
  OptimFile o;
  MEMENTO_ASSIGN_OR_RETURN(o.file, TorchFile::Open(fs, path));
  Doc root(path, &o.file->root());
  MEMENTO_ASSIGN_OR_RETURN(Doc osd, root.Key("optimizer_state_dict"));
  auto take_step = [&](const Doc& state) -> Status {
    if (const PickleValue* s = state.Find("step"); s != nullptr && !o.has_step) {
      MEMENTO_ASSIGN_OR_RETURN(o.step, Scalar(o.file.get(), s));
      o.has_step = true;
    }
    return Status::Ok();
  };
  if (stage == 3) {
    MEMENTO_ASSIGN_OR_RETURN(Doc inner, osd.Key("optimizer_state_dict"));
    MEMENTO_ASSIGN_OR_RETURN(Doc state, inner.Key("state"));
    MEMENTO_ASSIGN_OR_RETURN(Doc fp32, osd.Key("fp32_flat_groups"));
    for (size_t g = 0; g < fp32.size(); ++g) {
      MEMENTO_ASSIGN_OR_RETURN(Doc t, fp32.At(g));
      MEMENTO_RETURN_IF_ERROR(o.flat[0].Add(t));
      MEMENTO_ASSIGN_OR_RETURN(Doc sg, state.At(g));
      for (int s = 1; s < 3; ++s) {
        MEMENTO_ASSIGN_OR_RETURN(Doc m, sg.Key(kStates[s]));
        MEMENTO_RETURN_IF_ERROR(o.flat[s].Add(m));
      }
      MEMENTO_RETURN_IF_ERROR(take_step(sg));
    }
    for (auto& f : o.flat) f.file = o.file.get();
    return o;
  }
  MEMENTO_ASSIGN_OR_RETURN(Doc fp32, osd.Key("single_partition_of_fp32_groups"));
  MEMENTO_ASSIGN_OR_RETURN(Doc base, osd.Key("base_optimizer_state"));
  MEMENTO_ASSIGN_OR_RETURN(Doc maps, osd.Key("param_slice_mappings"));
  // base_optimizer_state: a torch optimizer state_dict ({'state': {g: ...}, 'param_groups'}), or
  // (elastic checkpoints) a list of per-group states.
  std::optional<Doc> state;
  if (base.Find("state") != nullptr) {
    MEMENTO_ASSIGN_OR_RETURN(state, base.Key("state"));
  } else {
    state = base;
  }
  for (size_t g = 0; g < fp32.size(); ++g) {
    std::array<FlatSeq, 3> seqs;
    MEMENTO_ASSIGN_OR_RETURN(Doc t, fp32.At(g));
    MEMENTO_RETURN_IF_ERROR(seqs[0].Add(t));
    MEMENTO_ASSIGN_OR_RETURN(Doc sg, state->At(g));
    for (int s = 1; s < 3; ++s) {
      MEMENTO_ASSIGN_OR_RETURN(Doc m, sg.Key(kStates[s]));
      MEMENTO_RETURN_IF_ERROR(seqs[s].Add(m));
    }
    MEMENTO_RETURN_IF_ERROR(take_step(sg));
    for (auto& f : seqs) f.file = o.file.get();
    o.groups.push_back(std::move(seqs));
    MEMENTO_ASSIGN_OR_RETURN(Doc mg, maps.At(g));
    if (mg.value()->kind != K::kDict) return mg.Bad("is " + mg.value()->TypeName() + ", not a dict");
    o.mappings.push_back(mg.value());
  }
  return o;
}

// The plain (writable) part of a value: tensors, objects and globals dropped.
PickleValuePtr PlainCopy(const PickleValue& v, int depth) {
  if (depth > 32) return nullptr;
  switch (v.kind) {
    case K::kNone: case K::kBool: case K::kInt: case K::kFloat: case K::kString: {
      auto c = std::make_shared<PickleValue>(v);
      return c;
    }
    case K::kList: case K::kTuple: {
      auto c = v.kind == K::kList ? PyList() : PyTuple();
      for (const auto& x : v.items) {
        PickleValuePtr y = PlainCopy(*x, depth + 1);
        if (y == nullptr) return nullptr;
        c->items.push_back(std::move(y));
      }
      return c;
    }
    case K::kDict: {
      auto c = PyDict(v.ordered);
      for (const auto& [k, x] : v.entries) {
        if (k->kind != K::kString && k->kind != K::kInt) continue;
        PickleValuePtr y = PlainCopy(*x, depth + 1);
        if (y == nullptr) continue;
        c->entries.emplace_back(std::make_shared<PickleValue>(*k), std::move(y));
      }
      return c;
    }
    default:
      return nullptr;
  }
}

struct Discovered {
  std::string tag_dir;
  int stage = 0;
  int tp = 1, pp = 1, dp = 1, mp = 1;
  std::string optim_prefix;  // "" or "bf16_"
  std::vector<std::string> model_files;  // per mp rank
};

Result<Discovered> Discover(FileSystem* fs, const std::string& dir, const DeepSpeedImportOptions& options) {
  Discovered d;
  std::string tag = options.tag;
  if (tag.empty() && fs->Exists(Join(dir, "latest"))) {
    MEMENTO_ASSIGN_OR_RETURN(tag, ReadFileToString(fs, Join(dir, "latest")));
    while (!tag.empty() && (tag.back() == '\n' || tag.back() == ' ' || tag.back() == '\r')) tag.pop_back();
  }
  if (tag.find('/') != std::string::npos || tag == ".." || tag == ".") {
    return InvalidArgument(Join(dir, "latest") + ": tag '" + tag + "' is not a folder name: refused");
  }
  d.tag_dir = tag.empty() ? dir : Join(dir, tag);
  Result<std::vector<std::string>> names = fs->ListDir(d.tag_dir);
  if (!names.ok()) return NotFound(d.tag_dir + ": no such DeepSpeed checkpoint directory");
  static const std::regex optim(R"(^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$)");
  static const std::regex model(R"(^mp_rank_(\d+)_model_states\.pt$)");
  static const std::regex zero3_model(R"(^zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt$)");
  static const std::regex layer(R"(^layer_01-model_(\d+)-model_states\.pt$)");
  std::map<int, bool> dps, mps;
  std::map<int, std::string> models, zero3_models;
  int layer_files = 0;
  for (const std::string& n : *names) {
    std::smatch m;
    if (std::regex_match(n, m, optim)) {
      d.optim_prefix = m[1].str();
      dps[std::stoi(m[2].str())] = true;
      mps[std::stoi(m[3].str())] = true;
    } else if (std::regex_match(n, m, model)) {
      models[std::stoi(m[1].str())] = n;
    } else if (std::regex_match(n, m, zero3_model)) {
      zero3_models[std::stoi(m[1].str())] = n;
    } else if (std::regex_match(n, m, layer)) {
      ++layer_files;
    }
  }
  if (dps.empty()) return NotFound(d.tag_dir + ": no zero_pp_rank_*_mp_rank_*_optim_states.pt files: not a DeepSpeed ZeRO checkpoint");
  d.dp = static_cast<int>(dps.size());
  d.mp = static_cast<int>(mps.size());
  if (dps.rbegin()->first != d.dp - 1 || mps.rbegin()->first != d.mp - 1) {
    return FailedPrecondition(d.tag_dir + ": optimizer files of dp ranks 0.." + std::to_string(dps.rbegin()->first) + " and mp ranks 0.." +
                              std::to_string(mps.rbegin()->first) + " are not complete");
  }
  for (int m = 0; m < d.mp; ++m) {
    if (models.count(m) != 0) {
      d.model_files.push_back(Join(d.tag_dir, models[m]));
    } else if (zero3_models.count(m) != 0) {
      d.model_files.push_back(Join(d.tag_dir, zero3_models[m]));
    } else {
      return NotFound(d.tag_dir + ": no model states file of mp rank " + std::to_string(m) + " (mp_rank_" + TwoDigits(m) + "_model_states.pt)");
    }
  }
  for (int dp = 0; dp < d.dp; ++dp) {
    for (int m = 0; m < d.mp; ++m) {
      const std::string f = d.optim_prefix + "zero_pp_rank_" + std::to_string(dp) + "_mp_rank_" + TwoDigits(m) + "_optim_states.pt";
      if (std::find(names->begin(), names->end(), f) == names->end()) return NotFound(Join(d.tag_dir, f) + ": missing");
    }
  }
  d.tp = options.tp > 0 ? options.tp : layer_files > 0 ? layer_files : 0;
  return d;
}

// One consolidated parameter, ready for the native writer.
struct Consolidated {
  std::string name;
  Dense states[3];
  double step = 0;
};

Result<std::string> ReadWholeFile(FileSystem* fs, const std::string& path) { return ReadFileToString(fs, path); }

// "deepspeed zero-1 tp 2 pp 2 dp 2: split dim 1", for the manifest's source_layout.
std::string SourceLayout(const MergeKind& k, int tp, int pp, int dp, int stage) {
  std::string s = "deepspeed zero-" + std::to_string(stage) + " tp " + std::to_string(tp) + " pp " + std::to_string(pp) + " dp " +
                  std::to_string(dp) + ": ";
  switch (k.kind) {
    case MergeKind::kReplicated: s += "tp replicated"; break;
    case MergeKind::kAverage: s += "tp averaged"; break;
    case MergeKind::kSubParams: {
      s += "sub_params [";
      for (size_t i = 0; i < k.sub->sizes.size(); ++i) s += (i > 0 ? "," : "") + std::to_string(k.sub->sizes[i]);
      s += "] dim " + std::to_string(k.dim);
      break;
    }
    case MergeKind::kTwoSub: s += "2 sub_params dim 0"; break;
    case MergeKind::kConcat: s += "split dim " + std::to_string(k.dim); break;
  }
  if (k.vocab) s += ", vocab";
  if (k.pipeline_replicated) s += ", pipeline replicated";
  return s;
}

Result<DeepSpeedImportSummary> Import(FileSystem* fs, const std::string& ds_dir, const std::string& out_dir,
                                      const DeepSpeedImportOptions& options) {
  const auto started = std::chrono::steady_clock::now();
  MEMENTO_ASSIGN_OR_RETURN(Discovered disc, Discover(fs, ds_dir, options));
  DeepSpeedImportSummary sum;
  sum.tag_dir = disc.tag_dir;
  // Model states of every mp rank: param_shapes (local shapes, parameter order), and the
  // universal_checkpoint_info, iteration and degrees of mp rank 0.
  std::vector<std::unique_ptr<TorchFile>> models;
  for (const std::string& path : disc.model_files) {
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<TorchFile> f, TorchFile::Open(fs, path));
    models.push_back(std::move(f));
  }
  const PickleValue& m0 = models[0]->root();
  const std::string& m0_path = disc.model_files[0];
  if (disc.tp == 0) {
    const PickleValue* args = m0.Get("args");
    const PickleValue* tpv = args != nullptr ? args->Get("tensor_model_parallel_size") : nullptr;
    disc.tp = tpv != nullptr && tpv->kind == K::kInt && tpv->i > 0 ? static_cast<int>(tpv->i) : disc.mp;
  }
  if (disc.mp % disc.tp != 0) {
    return FailedPrecondition(disc.tag_dir + ": " + std::to_string(disc.mp) + " mp ranks are not a multiple of tp " + std::to_string(disc.tp));
  }
  disc.pp = disc.mp / disc.tp;
  int stage = 0;
  {
    // zero_stage: from the first optimizer file (ZeRO-3 files say 3; BF16_Optimizer files may not say).
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<TorchFile> f0,
                             TorchFile::Open(fs, Join(disc.tag_dir, disc.optim_prefix + "zero_pp_rank_0_mp_rank_00_optim_states.pt")));
    const PickleValue* osd = f0->root().Get("optimizer_state_dict");
    if (osd == nullptr) return InvalidArgument(f0->path() + ": no key 'optimizer_state_dict': not a DeepSpeed optimizer file");
    const PickleValue* zs = osd->Get("zero_stage");
    stage = zs != nullptr && zs->kind == K::kInt ? static_cast<int>(zs->i) : 1;
    // The optimizer's global state for zero/optimizer_state.pt: the plain entries, without the
    // per-parameter parts.
    PickleValuePtr global = PyDict(false);
    for (const auto& [k, v] : osd->entries) {
      if (k->kind != K::kString) continue;
      static const char* kPerParam[] = {"single_partition_of_fp32_groups", "param_slice_mappings", "fp32_flat_groups",
                                        "base_optimizer_state", "optimizer_state_dict"};
      if (std::find(std::begin(kPerParam), std::end(kPerParam), k->s) != std::end(kPerParam)) continue;
      if (PickleValuePtr c = PlainCopy(*v, 0)) DictSet(global.get(), k->s, c);
    }
    const PickleValue* inner = osd->Get(stage == 3 ? "optimizer_state_dict" : "base_optimizer_state");
    if (inner != nullptr && inner->Get("param_groups") != nullptr) {
      if (PickleValuePtr c = PlainCopy(*inner->Get("param_groups"), 0)) DictSet(global.get(), "param_groups", c);
    }
    sum.zero_stage = stage;
    MEMENTO_ASSIGN_OR_RETURN(MergeRules rules, ParseRules(m0_path, m0.Get("universal_checkpoint_info")));
    if (const PickleValue* it = m0.Get("iteration"); it != nullptr && it->kind == K::kInt) {
      sum.iteration = it->i;
    } else if (const PickleValue* gs = m0.Get("global_steps"); gs != nullptr && gs->kind == K::kInt) {
      sum.iteration = gs->i;
    }
    sum.tp = disc.tp;
    sum.pp = disc.pp;
    sum.dp = disc.dp;

    // The consolidated tensors go straight into the universal checkpoint's files.
    UniversalSink sink(fs, out_dir, "deepspeed", disc.tag_dir, std::max<int64_t>(sum.iteration, 0), options.convert.write);
    MEMENTO_RETURN_IF_ERROR(sink.Begin());
    // Progress in bytes of the three states written, against the optimizer files' sizes (which
    // hold about those bytes, plus padding and replicated copies): the bar may end short of 100%.
    uint64_t progress_total = 0, progress_done = 0;
    for (int d = 0; d < disc.dp; ++d) {
      for (int m = 0; m < disc.mp; ++m) {
        Result<uint64_t> size = fs->FileSize(Join(disc.tag_dir, disc.optim_prefix + "zero_pp_rank_" + std::to_string(d) + "_mp_rank_" + TwoDigits(m) + "_optim_states.pt"));
        if (size.ok()) progress_total += *size;
      }
    }
    PickleValuePtr info = PyDict(false);
    DictSet(info.get(), "format", PyStr("memento-deepspeed-import"));
    DictSet(info.get(), "tp", PyInt(disc.tp));
    DictSet(info.get(), "pp", PyInt(disc.pp));
    DictSet(info.get(), "dp", PyInt(disc.dp));
    DictSet(info.get(), "zero_stage", PyInt(stage));
    DictSet(info.get(), "iteration", PyInt(sum.iteration));
    DictSet(info.get(), "optimizer_state", global);
    PickleValuePtr param_info = PyDict(true);
    std::map<std::string, int> seen_stage;

    for (int pp = 0; pp < disc.pp; ++pp) {
      // Parameter order and local shapes of this stage (from TP rank 0; every TP rank has the same names).
      struct Param {
        std::string name;
        size_t group;
        std::vector<std::vector<int64_t>> local_shapes;  // per TP rank
      };
      std::vector<Param> params;
      for (int r = 0; r < disc.tp; ++r) {
        const int mp = pp * disc.tp + r;
        Doc root(disc.model_files[static_cast<size_t>(mp)], &models[static_cast<size_t>(mp)]->root());
        MEMENTO_ASSIGN_OR_RETURN(Doc shapes, root.Key("param_shapes"));
        std::vector<Doc> groups;
        if (shapes.value()->kind == K::kDict) {
          groups.push_back(shapes);
        } else {
          for (size_t g = 0; g < shapes.size(); ++g) {
            MEMENTO_ASSIGN_OR_RETURN(Doc gd, shapes.At(g));
            groups.push_back(gd);
          }
        }
        size_t index = 0;
        for (size_t g = 0; g < groups.size(); ++g) {
          if (groups[g].value()->kind != K::kDict) return groups[g].Bad("is not a dict of parameter shapes");
          for (const auto& [k, v] : groups[g].value()->entries) {
            if (k->kind != K::kString) return groups[g].Bad("has a key that is not a name");
            MEMENTO_ASSIGN_OR_RETURN(std::vector<int64_t> shape, Shape(Doc(root.value() == nullptr ? "" : disc.model_files[static_cast<size_t>(mp)], v.get(), "param_shapes['" + k->s + "']")));
            if (r == 0) {
              params.push_back({k->s, g, {}});
            } else if (index >= params.size() || params[index].name != k->s) {
              return FailedPrecondition(disc.model_files[static_cast<size_t>(mp)] + ": parameter '" + k->s + "' differs from TP rank 0's order");
            }
            params[index].local_shapes.push_back(std::move(shape));
            ++index;
          }
        }
      }
      // The optimizer files of each TP rank of this stage, over all DP ranks.
      std::vector<std::vector<OptimFile>> optim(static_cast<size_t>(disc.tp));
      for (int r = 0; r < disc.tp; ++r) {
        const int mp = pp * disc.tp + r;
        for (int d = 0; d < disc.dp; ++d) {
          const std::string path = Join(disc.tag_dir, disc.optim_prefix + "zero_pp_rank_" + std::to_string(d) + "_mp_rank_" + TwoDigits(mp) + "_optim_states.pt");
          MEMENTO_ASSIGN_OR_RETURN(OptimFile o, OpenOptim(fs, path, stage));
          optim[static_cast<size_t>(r)].push_back(std::move(o));
        }
      }
      // Plan in parameter order (patterns, pipeline-replicated copies, ZeRO-3 offsets); then the
      // next parameter is read and merged on a second thread while this one is staged.
      struct Job {
        const Param* p;
        MergeKind kind;
        std::vector<int64_t> z3;  // ZeRO-3: the parameter's offset in each TP rank's flat partitions
      };
      std::vector<Job> jobs;
      std::vector<int64_t> zero3_offset(static_cast<size_t>(disc.tp), 0);
      auto advance = [&](const Param& p) {
        if (stage != 3) return;
        for (int r = 0; r < disc.tp; ++r) {
          const int64_t numel = NumElements(p.local_shapes[static_cast<size_t>(r)]);
          zero3_offset[static_cast<size_t>(r)] += (numel + disc.dp - 1) / disc.dp;
        }
      };
      for (const Param& p : params) {
        MergeKind kind = Classify(rules, p.name);
        auto seen = seen_stage.find(p.name);
        if (seen != seen_stage.end()) {
          if (!kind.pipeline_replicated) {
            return FailedPrecondition("parameter '" + p.name + "' is held by pipeline stages " + std::to_string(seen->second) + " and " +
                                      std::to_string(pp) + " but matches no pipeline_replicated_parameter_patterns");
          }
          advance(p);
          continue;  // the first stage's copy is kept
        }
        seen_stage[p.name] = pp;
        jobs.push_back({&p, kind, zero3_offset});
        advance(p);
      }
      // Reads only the optimizer files (pread) and `rules.original_vocab`; one call at a time.
      auto gather = [&](const Job& job) -> Result<Consolidated> {
        const Param& p = *job.p;
        const MergeKind& kind = job.kind;
        Consolidated c;
        c.name = p.name;
        for (int s = 0; s < 3; ++s) {
          std::vector<Dense> slices;
          for (int r = 0; r < disc.tp; ++r) {
            Dense local;
            local.shape = p.local_shapes[static_cast<size_t>(r)];
            const int64_t numel = NumElements(local.shape);
            local.bytes.reserve(static_cast<size_t>(numel) * 4);
            auto& files = optim[static_cast<size_t>(r)];
            const std::string what = "parameter '" + p.name + "' " + kStates[s];
            if (stage == 3) {
              const int64_t ps = (numel + disc.dp - 1) / disc.dp;
              for (int d = 0; d < disc.dp; ++d) {
                MEMENTO_RETURN_IF_ERROR(files[static_cast<size_t>(d)].flat[s].Read(job.z3[static_cast<size_t>(r)], ps, &local.bytes, what));
              }
              local.bytes.resize(static_cast<size_t>(numel) * 4);
            } else {
              for (int d = 0; d < disc.dp; ++d) {
                OptimFile& o = files[static_cast<size_t>(d)];
                if (p.group >= o.groups.size()) return InvalidArgument(o.file->path() + ": no parameter group " + std::to_string(p.group));
                const PickleValue* frag = o.mappings[p.group]->Get(p.name);
                if (frag == nullptr) continue;
                const PickleValue* n = frag->Field("numel", 0);
                const PickleValue* st = frag->Field("start", 1);
                if (n == nullptr || st == nullptr || n->kind != K::kInt || st->kind != K::kInt) {
                  return InvalidArgument(o.file->path() + ": param_slice_mappings['" + p.name + "'] is " + frag->TypeName() + ", not a fragment_address");
                }
                MEMENTO_RETURN_IF_ERROR(o.groups[p.group][static_cast<size_t>(s)].Read(st->i, n->i, &local.bytes, what));
              }
            }
            if (local.bytes.size() != static_cast<size_t>(numel) * 4) {
              return FailedPrecondition("parameter '" + p.name + "' of mp rank " + std::to_string(pp * disc.tp + r) + ": the DP fragments hold " +
                                        std::to_string(local.bytes.size() / 4) + " of " + std::to_string(numel) + " elements");
            }
            slices.push_back(std::move(local));
          }
          MEMENTO_ASSIGN_OR_RETURN(c.states[s], Merge(p.name, kind, std::move(slices), rules.original_vocab));
        }
        c.step = optim[0][0].step;
        return c;
      };
      std::future<Result<Consolidated>> next;
      if (!jobs.empty()) next = std::async(std::launch::async, gather, std::cref(jobs[0]));
      for (size_t ji = 0; ji < jobs.size(); ++ji) {
        Result<Consolidated> got = next.get();
        if (ji + 1 < jobs.size()) next = std::async(std::launch::async, gather, std::cref(jobs[ji + 1]));
        if (!got.ok()) return got.status();  // `next` waits for its gather on the way out
        Consolidated c = std::move(got).value();
        const Param& p = *jobs[ji].p;
        const MergeKind& kind = jobs[ji].kind;
        PickleValuePtr pi = PyDict(false);
        switch (kind.kind) {
          case MergeKind::kSubParams: {
            PickleValuePtr sp = PyDict(false);
            std::vector<PickleValuePtr> sizes;
            for (int64_t x : kind.sub->sizes) sizes.push_back(PyInt(x));
            std::vector<PickleValuePtr> shape{PyTuple(sizes)};
            for (size_t d = 1; d < c.states[0].shape.size(); ++d) shape.push_back(PyInt(c.states[0].shape[d]));
            DictSet(sp.get(), "patterns", PyList({PyStr(p.name)}));
            DictSet(sp.get(), "shape", PyTuple(shape));
            DictSet(sp.get(), "partition_dim", PyInt(kind.dim));
            DictSet(pi.get(), "sub_param_shape", sp);
            break;
          }
          case MergeKind::kTwoSub:
            DictSet(pi.get(), "param_n_sub_params", PyInt(2));
            DictSet(pi.get(), "cat_dim", PyInt(0));
            break;
          case MergeKind::kReplicated:
          case MergeKind::kAverage:
            break;
          case MergeKind::kConcat:
            DictSet(pi.get(), "cat_dim", PyInt(kind.dim));
            break;
        }
        if (kind.vocab) DictSet(pi.get(), "vocab_tensor", PyBool(true));
        DictSet(param_info.get(), p.name, pi);
        ++sum.params;
        const float step32 = static_cast<float>(c.step);
        std::vector<uint8_t> step_bytes(4);
        std::memcpy(step_bytes.data(), &step32, 4);
        std::vector<UniversalSink::State> states;
        for (int st = 0; st < 3; ++st) {
          progress_done += c.states[st].bytes.size();
          states.push_back({kStates[st], st == 0 ? c.name : c.name + "." + kStates[st], DType::kF32, c.states[st].shape,
                            std::move(c.states[st].bytes)});
        }
        states.push_back({"step", c.name + ".step", DType::kF32, {1}, std::move(step_bytes)});
        MEMENTO_RETURN_IF_ERROR(sink.AddParam(c.name, std::move(states), SourceLayout(kind, disc.tp, disc.pp, disc.dp, stage)));
        if (options.convert.progress) options.convert.progress(std::min(progress_done, progress_total), progress_total);
      }
    }
    DictSet(info.get(), "params", param_info);
    for (PatternList* l : rules.lists()) {
      for (size_t i = 0; i < l->used.size(); ++i) {
        if (!l->used[i]) sum.unmatched_patterns.push_back(l->key + ": " + l->text[i]);
      }
    }
    for (const SubParams& s : rules.sub_params) {
      for (size_t i = 0; i < s.patterns.used.size(); ++i) {
        if (!s.patterns.used[i]) sum.unmatched_patterns.push_back("parameter_with_sub_params: " + s.patterns.text[i]);
      }
    }
    MEMENTO_ASSIGN_OR_RETURN(std::string info_bytes, PickleForTorch(*info));
    sink.AddBlob(kInfoBlob, std::move(info_bytes));
    for (int m = 0; m < disc.mp; ++m) {
      MEMENTO_ASSIGN_OR_RETURN(std::string bytes, ReadWholeFile(fs, disc.model_files[static_cast<size_t>(m)]));
      sink.AddBlob(std::string(kModelStatesPrefix) + "mp_rank_" + TwoDigits(m) + "_model_states.pt", std::move(bytes));
    }
    sum.gather_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    MEMENTO_ASSIGN_OR_RETURN(sum.universal, sink.Commit());
  }
  return sum;
}

// A blob of a universal checkpoint, CRC-checked. NotFound when absent.
Result<std::string> ReadBlob(FileSystem* fs, const std::string& dir, const proto::UniversalManifest& m, const std::string& name) {
  for (const proto::UniversalBlob& b : m.blobs()) {
    if (b.name() != name) continue;
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> f, fs->NewReadableFile(Join(dir, b.file())));
    std::string bytes(b.bytes(), '\0');
    MEMENTO_RETURN_IF_ERROR(f->ReadAt(b.data_offset(), bytes.data(), bytes.size()));
    if (Crc64(bytes.data(), bytes.size()) != b.crc64()) return DataLoss(Join(dir, b.file()) + ": blob '" + name + "': CRC mismatch");
    return bytes;
  }
  return NotFound(dir + ": no blob '" + name + "'");
}

// Copies the plain entries of `from` into `to`.
void CopyEntries(const PickleValue* from, PickleValue* to) {
  if (from == nullptr || from->kind != K::kDict) return;
  for (const auto& [k, v] : from->entries) {
    if (PickleValuePtr c = PlainCopy(*v, 0); c != nullptr && k->kind == K::kString) DictSet(to, k->s, c);
  }
}

Result<DeepSpeedExportSummary> Export(FileSystem* fs, const std::string& ucp_dir, const std::string& out_dir, const std::string& tmp) {
  MEMENTO_ASSIGN_OR_RETURN(proto::UniversalManifest m, ReadUniversalManifest(fs, ucp_dir));
  DeepSpeedExportSummary sum;
  sum.out_dir = out_dir;
  PickleValuePtr info;
  Result<std::string> info_bytes = ReadBlob(fs, ucp_dir, m, kInfoBlob);
  if (info_bytes.ok()) {
    Result<PickleValuePtr> v = Unpickle(*info_bytes, PickleLimits{.strict_globals = true});
    if (!v.ok()) return v.status().WithContext(ucp_dir + ": blob '" + kInfoBlob + "'");
    info = std::move(v).value();
  } else if (info_bytes.status().code() != StatusCode::kNotFound) {
    return info_bytes.status();
  }
  const PickleValue* params_info = info != nullptr ? info->Get("params") : nullptr;
  MEMENTO_RETURN_IF_ERROR(fs->CreateDirs(Join(tmp, "zero")));
  double step = 0;
  for (const proto::UniversalParam& p : m.params()) {
    const std::string& name = p.name();
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == ".." || name.find('\0') != std::string::npos) {
      return InvalidArgument(ucp_dir + ": parameter name '" + name + "' cannot be a folder name under zero/: refused");
    }
    const std::string pdir = Join(Join(tmp, "zero"), name);
    MEMENTO_RETURN_IF_ERROR(fs->CreateDirs(pdir));
    const PickleValue* pi = params_info != nullptr ? params_info->Get(name) : nullptr;
    for (const proto::UniversalTensor& t : p.states()) {
      MEMENTO_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadUniversalTensor(fs, ucp_dir, m, name, t.state()));
      MEMENTO_ASSIGN_OR_RETURN(DType dtype, DTypeFromInt(t.dtype()));
      std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
      TorchFileBuilder b;
      sum.tensor_bytes += bytes.size();
      if (t.state() == "step") {
        if (dtype == DType::kF32 && bytes.size() == 4) {
          float x;
          std::memcpy(&x, bytes.data(), 4);
          step = x;
        }
        // DeepSpeed's step.pt holds a 0-dim tensor.
        const std::vector<int64_t> step_shape = bytes.size() == DTypeSize(dtype) ? std::vector<int64_t>{} : shape;
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr v, b.AddTensor(dtype, step_shape, std::move(bytes)));
        MEMENTO_RETURN_IF_ERROR(b.Write(fs, Join(pdir, "step.pt"), *v, "step"));
        ++sum.files;
        continue;
      }
      const std::string file = t.state() == "fp32" ? "fp32" : t.state();
      if (file.find('/') != std::string::npos || file.find("..") != std::string::npos) {
        return InvalidArgument(ucp_dir + ": state name '" + file + "' of parameter '" + name + "' cannot be a file name: refused");
      }
      MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr v, b.AddTensor(dtype, shape, std::move(bytes)));
      PickleValuePtr top = PyDict(false);
      DictSet(top.get(), "param", v);
      if (pi != nullptr) {
        CopyEntries(pi, top.get());
      } else {
        DictSet(top.get(), "cat_dim", PyInt(0));
      }
      MEMENTO_RETURN_IF_ERROR(b.Write(fs, Join(pdir, file + ".pt"), *top, file));
      ++sum.files;
    }
    ++sum.params;
  }
  // zero/optimizer_state.pt: the source optimizer's global state and param groups.
  PickleValuePtr osd = PyDict(false);
  if (info != nullptr) CopyEntries(info->Get("optimizer_state"), osd.get());
  if (osd->Get("param_groups") == nullptr) {
    PickleValuePtr g = PyDict(false);
    DictSet(g.get(), "step", PyFloat(step));
    DictSet(g.get(), "params", PyList());
    DictSet(osd.get(), "param_groups", PyList({g}));
  }
  {
    TorchFileBuilder b;
    MEMENTO_RETURN_IF_ERROR(b.Write(fs, Join(Join(tmp, "zero"), "optimizer_state.pt"), *osd, "optimizer_state"));
    ++sum.files;
  }
  // mp_rank_XX_model_states.pt kept by the import.
  for (const proto::UniversalBlob& blob : m.blobs()) {
    const std::string& n = blob.name();
    if (n.rfind(kModelStatesPrefix, 0) != 0 || n == kInfoBlob) continue;
    const std::string file = n.substr(std::string(kModelStatesPrefix).size());
    if (file.find('/') != std::string::npos || file.find("..") != std::string::npos || file.empty()) {
      return InvalidArgument(ucp_dir + ": blob '" + n + "' cannot be a file name: refused");
    }
    MEMENTO_ASSIGN_OR_RETURN(std::string bytes, ReadBlob(fs, ucp_dir, m, n));
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> w, fs->NewWritableFile(Join(tmp, file), WriteOptions{.direct_io = false}));
    MEMENTO_RETURN_IF_ERROR(w->Append(bytes.data(), bytes.size()));
    MEMENTO_RETURN_IF_ERROR(w->Close());
    ++sum.files;
  }
  return sum;
}

}  // namespace

Result<DeepSpeedImportSummary> ImportDeepSpeed(FileSystem* fs, const std::string& ds_dir, const std::string& out_dir,
                                               const DeepSpeedImportOptions& options) {
  if (fs->Exists(out_dir)) return AlreadyExists(out_dir + " already exists; the universal checkpoint needs a new path");
  return Import(fs, ds_dir, out_dir, options);
}

Result<ConvertSummary> ImportTorchFile(FileSystem* fs, const std::string& path, const std::string& out_dir,
                                       const ConvertOptions& options) {
  if (fs->Exists(out_dir)) return AlreadyExists(out_dir + " already exists; the universal checkpoint needs a new path");
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<TorchFile> f, TorchFile::Open(fs, path));
  const std::string staging = Join(Parent(out_dir), "." + Basename(out_dir) + ".torch-import-" + std::to_string(::getpid()));
  fs->RemoveAll(staging).IgnoreError();
  auto run = [&]() -> Result<ConvertSummary> {
    NativeStaging sink(fs, staging, 0);
    std::map<std::string, bool> seen;
    // Containers already walked: a pickle may share one many times (memo), which must not make
    // the walk exponential; a shared container's tensors keep their first name.
    std::map<const PickleValue*, bool> walked;
    // Depth-first over dicts and lists (the pickle machine bounds the nesting).
    std::function<Status(const PickleValue&, const std::string&)> walk = [&](const PickleValue& v, const std::string& prefix) -> Status {
      if (v.kind == K::kTensor) {
        if (prefix.empty()) return InvalidArgument(path + ": a bare tensor; a dict of named tensors is expected");
        if (!seen.emplace(prefix, true).second) return Status::Ok();  // the same tensor reached twice
        MEMENTO_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, f->ReadTensor(v.tensor));
        return sink.AddTensor(prefix, v.tensor.dtype, v.tensor.size, std::move(bytes));
      }
      if ((v.kind == K::kDict || v.kind == K::kList || v.kind == K::kTuple) && !walked.emplace(&v, true).second) return Status::Ok();
      if (v.kind == K::kDict) {
        for (const auto& [k, x] : v.entries) {
          const std::string key = k->kind == K::kString ? k->s : k->kind == K::kInt ? std::to_string(k->i) : "";
          if (!key.empty()) MEMENTO_RETURN_IF_ERROR(walk(*x, prefix.empty() ? key : prefix + "." + key));
        }
      } else if (v.kind == K::kList || v.kind == K::kTuple) {
        for (size_t i = 0; i < v.items.size(); ++i) {
          MEMENTO_RETURN_IF_ERROR(walk(*v.items[i], prefix.empty() ? std::to_string(i) : prefix + "." + std::to_string(i)));
        }
      }
      return Status::Ok();
    };
    MEMENTO_RETURN_IF_ERROR(walk(f->root(), ""));
    if (seen.empty()) return InvalidArgument(path + ": no tensors in the file");
    MEMENTO_RETURN_IF_ERROR(sink.Finish());
    return ConvertNativeToUniversal(fs, staging, out_dir, options);
  };
  Result<ConvertSummary> r = run();
  fs->RemoveAll(staging).IgnoreError();
  return r;
}

Result<DeepSpeedExportSummary> ExportDeepSpeedUniversal(FileSystem* fs, const std::string& ucp_dir, const std::string& out_dir) {
  if (fs->Exists(out_dir)) return AlreadyExists(out_dir + " already exists; the DeepSpeed universal checkpoint needs a new path");
  const std::string parent = Parent(out_dir);
  const std::string tmp = Join(parent, "." + Basename(out_dir) + ".tmp-" + std::to_string(::getpid()));
  fs->RemoveAll(tmp).IgnoreError();
  Result<DeepSpeedExportSummary> r = Export(fs, ucp_dir, out_dir, tmp);
  if (!r.ok()) {
    fs->RemoveAll(tmp).IgnoreError();
    return r;
  }
  Status st = fs->SyncDir(tmp);
  if (st.ok()) st = fs->Rename(tmp, out_dir);
  if (st.ok()) st = fs->SyncDir(parent);
  if (st.ok()) st = WriteFileAtomically(fs, Join(parent, "latest_universal"), Basename(out_dir));
  if (!st.ok()) {
    fs->RemoveAll(tmp).IgnoreError();
    return st;
  }
  return r;
}

}  // namespace memento
