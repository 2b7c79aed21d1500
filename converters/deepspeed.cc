// DeepSpeed import and export (converters/deepspeed.h). Import: per pipeline stage and TP rank
// (an "mp rank"), each parameter's fragments are gathered from the DP ranks' optimizer files
// (param_slice_mappings for ZeRO-1/2, ceil(numel / dp) pieces for ZeRO-3), the TP slices are
// merged by the universal_checkpoint_info patterns (Python re.match: anchored at the start), each
// state read straight into its merged buffer and streamed into the universal writer
// (UniversalSink), which CRCs and commits them. Export writes DeepSpeed's universal layout.
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
  constexpr int64_t kMaxElements = int64_t{1} << 50;  // no overflow in element or byte counts
  int64_t n = 1;
  for (const auto& x : v->items) {
    if (x->kind != K::kInt || x->i < 0) return d.Bad("is not a shape of non-negative ints");
    if (x->i > 0 && n > kMaxElements / x->i) return d.Bad("declares more than 2^50 elements");
    n *= std::max<int64_t>(x->i, 1);
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
      if (!RegexNumbersFit(t)) {
        return InvalidArgument(file + ": universal_checkpoint_info." + key + " pattern '" + t + "': a number of more than 9 digits");
      }
      try {
        // The patterns come from the checkpoint file: matched by the automaton (libstdc++'s
        // __polynomial), not by backtracking, which takes exponential time on "(a|aa)*c" and
        // recurses once per character of the name. Only whether a pattern matches is used.
        re.emplace_back(t, std::regex::ECMAScript | std::regex_constants::__polynomial);
      } catch (const std::regex_error& e) {
        return InvalidArgument(file + ": universal_checkpoint_info." + key + " pattern '" + t + "': " + e.what());
      }
    }
    used.assign(re.size(), false);
    return Status::Ok();
  }
  // Python re.match: anchored at the start only. The index of the first pattern that matches, -1.
  int MatchIndex(const std::string& name) {
    for (size_t i = 0; i < re.size(); ++i) {
      if (std::regex_search(name, re[i], std::regex_constants::match_continuous)) {
        used[i] = true;
        return static_cast<int>(i);
      }
    }
    return -1;
  }
  bool Match(const std::string& name) { return MatchIndex(name) >= 0; }
};

struct SubParams {
  PatternList patterns;
  std::vector<int64_t> sizes;  // along partition_dim
  int dim = 0;
  // universal_checkpoint_info.sub_param_shard_widths of each pattern (same index as
  // patterns.text): per sub-parameter, its width on each TP rank; empty when not given.
  std::vector<std::vector<std::vector<int64_t>>> widths;
};

struct MergeRules {
  PatternList vocab{"vocabulary_parameter_patterns"}, pipeline{"pipeline_replicated_parameter_patterns"},
      replicated{"tp_replicated_parameter_patterns"}, average{"parameter_to_average_patterns"},
      row{"parameter_with_row_parallelism_patterns"}, two_sub{"parameter_with_2_sub_params_cat_dim_0"};
  std::vector<SubParams> sub_params;
  int64_t original_vocab = 0;

  std::vector<PatternList*> lists() { return {&vocab, &pipeline, &replicated, &average, &row, &two_sub}; }
};

// sub_param_shard_widths[pattern] (DeepSpeed's universal checkpoint version 0.4): a list, per
// sub-parameter, of its width on each TP rank. Empty when the pattern has none.
Result<std::vector<std::vector<int64_t>>> ShardWidths(const std::string& file, const PickleValue* all, const std::string& pattern) {
  std::vector<std::vector<int64_t>> out;
  const PickleValue* w = all != nullptr ? all->Get(pattern) : nullptr;
  if (w == nullptr) return out;
  const std::string where = file + ": universal_checkpoint_info.sub_param_shard_widths['" + pattern + "']";
  if (w->kind != K::kList && w->kind != K::kTuple) return InvalidArgument(where + " is " + w->TypeName() + ", not a list");
  for (const auto& sub : w->items) {
    if (sub->kind != K::kList && sub->kind != K::kTuple) return InvalidArgument(where + " holds " + sub->TypeName() + ", not a list of widths");
    std::vector<int64_t> per_rank;
    for (const auto& x : sub->items) {
      if (x->kind != K::kInt || x->i < 0) return InvalidArgument(where + " holds a width that is not a non-negative int");
      per_rank.push_back(x->i);
    }
    out.push_back(std::move(per_rank));
  }
  return out;
}

Result<MergeRules> ParseRules(const std::string& file, const PickleValue* uci) {
  MergeRules r;
  if (uci == nullptr || uci->kind != K::kDict) return r;  // no info: every parameter concatenates on dim 0
  for (PatternList* l : r.lists()) {
    l->text = Strings(uci->Get(l->key));
    MEMENTO_RETURN_IF_ERROR(l->Compile(file));
  }
  if (const PickleValue* v = uci->Get("original_vocab_size"); v != nullptr && v->kind == K::kInt) r.original_vocab = v->i;
  const PickleValue* widths = uci->Get("sub_param_shard_widths");
  if (widths != nullptr && widths->kind != K::kDict) {
    return InvalidArgument(file + ": universal_checkpoint_info.sub_param_shard_widths is " + widths->TypeName() + ", not a dict");
  }
  if (const PickleValue* subs = uci->Get("parameter_with_sub_params"); subs != nullptr && subs->kind == K::kList) {
    for (const auto& s : subs->items) {
      // A SubparamShape object or a dict of its fields (DeepSpeed builds SubparamShape(**d)).
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
      for (int64_t x : sp.sizes) {
        if (x < 0) return InvalidArgument(file + ": universal_checkpoint_info.parameter_with_sub_params: a sub-parameter size of " + std::to_string(x));
      }
      for (const std::string& t : sp.patterns.text) {
        MEMENTO_ASSIGN_OR_RETURN(std::vector<std::vector<int64_t>> w, ShardWidths(file, widths, t));
        sp.widths.push_back(std::move(w));
      }
      MEMENTO_RETURN_IF_ERROR(sp.patterns.Compile(file));
      r.sub_params.push_back(std::move(sp));
    }
  }
  return r;
}

// How the TP slices of a parameter merge, and what DeepSpeed's universal files record about it.
struct MergeKind {
  enum { kConcat, kReplicated, kAverage, kSubParams, kTwoSub } kind = kConcat;
  int dim = 0;
  bool vocab = false;
  bool pipeline_replicated = false;
  const SubParams* sub = nullptr;
  // kSubParams: the sub_param_shard_widths of the pattern that matched (empty when none).
  const std::vector<std::vector<int64_t>>* widths = nullptr;
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
      const int i = s.patterns.MatchIndex(name);
      if (i >= 0) {
        k.kind = MergeKind::kSubParams;
        k.sub = &s;
        k.dim = s.dim;
        k.widths = &s.widths[static_cast<size_t>(i)];
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

// How the TP slices of a parameter make its merged tensor (computed from the slices' shapes, before
// any data is read). Along `dim`, the merged tensor is the sub-parameters one after the other, each
// the concatenation of its pieces on the TP ranks (`widths[i][r]`: sub-parameter i's width on rank
// r; a plain split is one sub-parameter). Each rank's slice holds its pieces of every
// sub-parameter in order.
struct MergeLayout {
  enum { kPieces, kFirst, kAverage } how = kPieces;
  int dim = 0;
  std::vector<std::vector<int64_t>> widths;  // kPieces
  std::vector<int64_t> sub_sizes;            // kSubParams, kTwoSub: full size of each sub-parameter
  std::vector<int64_t> full_shape;           // merged, before the vocab cut
  std::vector<int64_t> shape;                // merged, vocabulary padding rows cut
  int64_t kept = 0;                          // elements of `shape` (a prefix of full_shape's)
};

Result<MergeLayout> PlanMerge(const std::string& name, const MergeKind& k, const std::vector<std::vector<int64_t>>& local,
                              int64_t original_vocab) {
  const size_t tp = local.size();
  const std::string what = "parameter '" + name + "'";
  for (const std::vector<int64_t>& s : local) {
    if (s.size() != local[0].size()) {
      return FailedPrecondition(what + ": TP slices of shapes " + ShapeString(local[0]) + " and " + ShapeString(s) + " have different ranks");
    }
  }
  MergeLayout m;
  m.full_shape = local[0];
  bool even = false;  // sub-parameter widths taken as an even split (no sub_param_shard_widths)
  auto same_shapes = [&](const char* why) -> Status {
    for (const std::vector<int64_t>& s : local) {
      if (s != local[0]) return FailedPrecondition(what + ": TP slices of shapes " + ShapeString(local[0]) + " and " + ShapeString(s) + " " + why);
    }
    return Status::Ok();
  };
  switch (k.kind) {
    case MergeKind::kReplicated:
      m.how = MergeLayout::kFirst;
      break;
    case MergeKind::kAverage:
      m.how = MergeLayout::kAverage;
      MEMENTO_RETURN_IF_ERROR(same_shapes("cannot be averaged"));
      break;
    case MergeKind::kConcat:
      if (tp == 1) {
        m.how = MergeLayout::kFirst;
        break;
      }
      if (static_cast<size_t>(k.dim) >= local[0].size()) {
        return FailedPrecondition(what + ": cannot concatenate " + std::to_string(local[0].size()) + "-d slices on dim " + std::to_string(k.dim));
      }
      m.dim = k.dim;
      m.widths.emplace_back();
      for (const std::vector<int64_t>& s : local) m.widths[0].push_back(s[static_cast<size_t>(k.dim)]);
      break;
    case MergeKind::kTwoSub:
    case MergeKind::kSubParams: {
      m.dim = k.kind == MergeKind::kTwoSub ? 0 : k.dim;
      const auto d = static_cast<size_t>(m.dim);
      if (d >= local[0].size()) return FailedPrecondition(what + ": sub-parameter dim " + std::to_string(m.dim) + " out of range of " + ShapeString(local[0]));
      if (k.kind == MergeKind::kTwoSub) {
        m.widths.assign(2, {});
        for (size_t r = 0; r < tp; ++r) {
          if (local[r][0] % 2 != 0) {
            return FailedPrecondition(what + ": TP slice of " + std::to_string(local[r][0]) + " rows does not hold 2 sub-parameters");
          }
          m.widths[0].push_back(local[r][0] / 2);
          m.widths[1].push_back(local[r][0] / 2);
        }
      } else if (k.widths != nullptr && !k.widths->empty()) {
        m.widths = *k.widths;
        if (m.widths.size() != k.sub->sizes.size()) {
          return FailedPrecondition(what + ": sub_param_shard_widths has " + std::to_string(m.widths.size()) + " entries for " +
                                    std::to_string(k.sub->sizes.size()) + " sub-parameters");
        }
        for (size_t i = 0; i < m.widths.size(); ++i) {
          int64_t sum = 0;
          for (int64_t w : m.widths[i]) sum += w;
          if (m.widths[i].size() != tp || sum != k.sub->sizes[i]) {
            return FailedPrecondition(what + ": sub_param_shard_widths of sub-parameter " + std::to_string(i) + " are " + ShapeString(m.widths[i]) +
                                      ", not " + std::to_string(tp) + " widths adding up to its size " + std::to_string(k.sub->sizes[i]));
          }
        }
      } else {
        even = true;
        m.widths.assign(k.sub->sizes.size(), {});
        for (size_t i = 0; i < k.sub->sizes.size(); ++i) {
          const int64_t s = k.sub->sizes[i];
          if (s % static_cast<int64_t>(tp) != 0) {
            return FailedPrecondition(what + ": sub-parameter " + std::to_string(i) + " of " + std::to_string(s) + " on dim " + std::to_string(m.dim) +
                                      " does not split evenly over tp " + std::to_string(tp) +
                                      ", and universal_checkpoint_info has no sub_param_shard_widths for its pattern");
          }
          m.widths[i].assign(tp, s / static_cast<int64_t>(tp));
        }
      }
      break;
    }
  }
  if (m.how == MergeLayout::kPieces) {
    const auto d = static_cast<size_t>(m.dim);
    int64_t merged = 0;
    for (size_t r = 0; r < tp; ++r) {
      int64_t held = 0;
      for (const std::vector<int64_t>& w : m.widths) held += w[r];
      if (held != local[r][d]) {
        return FailedPrecondition(what + ": TP rank " + std::to_string(r) + "'s slice " + ShapeString(local[r]) + " has " +
                                  std::to_string(local[r][d]) + " on dim " + std::to_string(m.dim) + ", its sub-parameter widths add up to " +
                                  std::to_string(held) +
                                  (even ? " (an even split: universal_checkpoint_info has no sub_param_shard_widths for its pattern)" : ""));
      }
      std::vector<int64_t> a = local[r], b = local[0];
      a[d] = b[d] = 0;
      if (a != b) return FailedPrecondition(what + ": TP slices of shapes " + ShapeString(local[0]) + " and " + ShapeString(local[r]) + " differ outside dim " + std::to_string(m.dim));
    }
    for (const std::vector<int64_t>& w : m.widths) {
      int64_t size = 0;
      for (int64_t x : w) size += x;
      if (k.kind == MergeKind::kSubParams || k.kind == MergeKind::kTwoSub) m.sub_sizes.push_back(size);
      merged += size;
    }
    m.full_shape[d] = merged;
  }
  m.shape = m.full_shape;
  if (k.vocab && original_vocab > 0 && !m.shape.empty() && m.shape[0] > original_vocab) m.shape[0] = original_vocab;
  m.kept = NumElements(m.shape);
  return m;
}

// Elements [from, from + n) of a TP rank's slice go to elements [to, to + n) of the merged tensor.
struct SliceRun {
  int64_t from, n, to;
};

// Per TP rank, the runs that carry its slice into the merged tensor (vocab rows cut), in slice
// order; empty for a rank that is not read. kAverage: every rank's whole slice, element for element.
std::vector<std::vector<SliceRun>> PlanRuns(const MergeLayout& m, const std::vector<std::vector<int64_t>>& local) {
  std::vector<std::vector<SliceRun>> runs(local.size());
  auto add = [&](std::vector<SliceRun>* out, int64_t from, int64_t n, int64_t to) {
    n = std::min(n, m.kept - to);  // vocab: the rows from original_vocab_size on are cut
    if (n <= 0) return;
    if (!out->empty() && out->back().from + out->back().n == from && out->back().to + out->back().n == to) {
      out->back().n += n;
      return;
    }
    out->push_back({from, n, to});
  };
  if (m.how != MergeLayout::kPieces) {
    for (size_t r = 0; r < (m.how == MergeLayout::kFirst ? 1 : local.size()); ++r) add(&runs[r], 0, NumElements(local[r]), 0);
    return runs;
  }
  const auto d = static_cast<size_t>(m.dim);
  int64_t outer = 1, inner = 1;
  for (size_t i = 0; i < d; ++i) outer *= m.full_shape[i];
  for (size_t i = d + 1; i < m.full_shape.size(); ++i) inner *= m.full_shape[i];
  const int64_t merged = m.full_shape[d];
  for (size_t r = 0; r < local.size(); ++r) {
    const int64_t width = local[r][d];
    for (int64_t o = 0; o < outer; ++o) {
      int64_t in_slice = 0, sub_start = 0;
      for (const std::vector<int64_t>& w : m.widths) {
        int64_t before = 0;  // this sub-parameter's rows on the ranks before r
        for (size_t q = 0; q < r; ++q) before += w[q];
        add(&runs[r], (o * width + in_slice) * inner, w[r] * inner, (o * merged + sub_start + before) * inner);
        in_slice += w[r];
        for (int64_t x : w) sub_start += x;
      }
    }
  }
  return runs;
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
  // Whether elements [start, start + n) lie inside.
  bool Holds(int64_t start, int64_t n) const { return start >= 0 && n >= 0 && start <= numel() && n <= numel() - start; }
  // Elements [start, start + n) into `dst` (n x 4 bytes).
  Status ReadInto(int64_t start, int64_t n, uint8_t* dst, const std::string& what) const {
    if (!Holds(start, n)) {
      return DataLoss(file->path() + ": " + what + ": " + std::to_string(n) + " elements from " + std::to_string(start) +
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
      MEMENTO_RETURN_IF_ERROR(file->ReadTensorInto(sub, dst));
      dst += take * 4;
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

// The plain (writable) part of a value: tensors, objects and globals dropped. A container the value
// shares (a pickle's memo can share one 2^n times through n levels) is copied once per depth and
// stays shared in the copy, which PickleForTorch writes once.
PickleValuePtr PlainCopy(const PickleValue& v, int depth, std::map<std::pair<const PickleValue*, int>, PickleValuePtr>* copies) {
  if (depth > 32) return nullptr;
  if (auto it = copies->find({&v, depth}); it != copies->end()) return it->second;
  PickleValuePtr c;
  switch (v.kind) {
    case K::kNone: case K::kBool: case K::kInt: case K::kFloat: case K::kString:
      c = std::make_shared<PickleValue>(v);
      break;
    case K::kList: case K::kTuple: {
      c = v.kind == K::kList ? PyList() : PyTuple();
      for (const auto& x : v.items) {
        PickleValuePtr y = PlainCopy(*x, depth + 1, copies);
        if (y == nullptr) {
          c = nullptr;
          break;
        }
        c->items.push_back(std::move(y));
      }
      break;
    }
    case K::kDict: {
      c = PyDict(v.ordered);
      for (const auto& [k, x] : v.entries) {
        if (k->kind != K::kString && k->kind != K::kInt) continue;
        PickleValuePtr y = PlainCopy(*x, depth + 1, copies);
        if (y == nullptr) continue;
        c->entries.emplace_back(std::make_shared<PickleValue>(*k), std::move(y));
      }
      break;
    }
    default:
      break;
  }
  (*copies)[{&v, depth}] = c;
  return c;
}

PickleValuePtr PlainCopy(const PickleValue& v, int depth) {
  std::map<std::pair<const PickleValue*, int>, PickleValuePtr> copies;
  return PlainCopy(v, depth, &copies);
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

// A byte buffer that keeps its memory from one use to the next and is never zero-filled.
class Buffer {
 public:
  uint8_t* Reserve(size_t n) {
    if (n > capacity_) {
      data_.reset();  // the old memory goes before the new is taken
      data_.reset(new uint8_t[n]);
      capacity_ = n;
    }
    return data_.get();
  }
  uint8_t* data() { return data_.get(); }

 private:
  std::unique_ptr<uint8_t[]> data_;
  size_t capacity_ = 0;
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
      // Plan in parameter order (patterns, pipeline-replicated copies, merge layouts, where each
      // TP slice lies in the DP ranks' flat partitions). Then each state of each parameter is
      // gathered straight into its merged buffer on a second thread while the one before is written:
      // two merged states and one TP slice in memory at most.
      struct DpPiece {
        int64_t begin, n;  // elements of the TP slice
        int dp;            // the DP rank whose flat partition holds them
        int64_t start;     // from this element of that partition
      };
      struct Job {
        const Param* p;
        MergeKind kind;
        MergeLayout layout;
        std::vector<std::vector<DpPiece>> pieces;  // per TP rank, in slice order
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
        Job job{&p, kind, {}, std::vector<std::vector<DpPiece>>(static_cast<size_t>(disc.tp))};
        MEMENTO_ASSIGN_OR_RETURN(job.layout, PlanMerge(p.name, kind, p.local_shapes, rules.original_vocab));
        for (int r = 0; r < disc.tp; ++r) {
          const int64_t numel = NumElements(p.local_shapes[static_cast<size_t>(r)]);
          auto& frags = job.pieces[static_cast<size_t>(r)];
          int64_t held = 0;
          if (stage == 3) {
            const int64_t ps = (numel + disc.dp - 1) / disc.dp;
            for (int d = 0; d < disc.dp; ++d) {
              const int64_t n = std::min(ps, numel - held);
              if (n > 0) frags.push_back({held, n, d, zero3_offset[static_cast<size_t>(r)]});
              held += std::max<int64_t>(n, 0);
            }
          } else {
            for (int d = 0; d < disc.dp; ++d) {
              const OptimFile& o = optim[static_cast<size_t>(r)][static_cast<size_t>(d)];
              if (p.group >= o.groups.size()) return InvalidArgument(o.file->path() + ": no parameter group " + std::to_string(p.group));
              const PickleValue* frag = o.mappings[p.group]->Get(p.name);
              if (frag == nullptr) continue;
              const PickleValue* n = frag->Field("numel", 0);
              const PickleValue* st = frag->Field("start", 1);
              if (n == nullptr || st == nullptr || n->kind != K::kInt || st->kind != K::kInt || n->i < 0) {
                return InvalidArgument(o.file->path() + ": param_slice_mappings['" + p.name + "'] is " + frag->TypeName() + ", not a fragment_address");
              }
              frags.push_back({held, n->i, d, st->i});
              held += n->i;
            }
          }
          if (held != numel) {
            return FailedPrecondition("parameter '" + p.name + "' of mp rank " + std::to_string(pp * disc.tp + r) + ": the DP fragments hold " +
                                      std::to_string(held) + " of " + std::to_string(numel) + " elements");
          }
          // Every piece inside its flat partition of every state: what is read (and allocated) is
          // bounded by the files' real data, whatever the shapes and mappings declare.
          for (const DpPiece& f : frags) {
            const OptimFile& o = optim[static_cast<size_t>(r)][static_cast<size_t>(f.dp)];
            for (int st = 0; st < 3; ++st) {
              const FlatSeq& seq = stage == 3 ? o.flat[st] : o.groups[p.group][static_cast<size_t>(st)];
              if (!seq.Holds(f.start, f.n)) {
                return DataLoss(o.file->path() + ": parameter '" + p.name + "' " + kStates[st] + ": " + std::to_string(f.n) + " elements from " +
                                std::to_string(f.start) + " outside the flat partition of " + std::to_string(seq.numel()));
              }
            }
          }
        }
        jobs.push_back(std::move(job));
        advance(p);
      }
      // Elements [from, from + n) of TP rank r's slice of state s into `dst`, from the DP ranks'
      // flat partitions. The gather thread's only reads (pread of the optimizer files).
      auto read_slice = [&](const Job& job, int r, int s, int64_t from, int64_t n, uint8_t* dst) -> Status {
        const std::string what = "parameter '" + job.p->name + "' " + kStates[s];
        for (const DpPiece& f : job.pieces[static_cast<size_t>(r)]) {
          const int64_t a = std::max(from, f.begin), b = std::min(from + n, f.begin + f.n);
          if (a >= b) continue;
          const OptimFile& o = optim[static_cast<size_t>(r)][static_cast<size_t>(f.dp)];
          const FlatSeq& seq = stage == 3 ? o.flat[s] : o.groups[job.p->group][static_cast<size_t>(s)];
          MEMENTO_RETURN_IF_ERROR(seq.ReadInto(f.start + (a - f.begin), b - a, dst + (a - from) * 4, what));
        }
        return Status::Ok();
      };
      // A few runs (dim-0 splits, sub-parameters on dim 0) are read straight into the merged
      // buffer; many (a split on dim 1 has one per row) through the slice buffer.
      constexpr size_t kDirectRuns = 64;
      Buffer slice;                                 // the gather thread's
      std::vector<std::vector<SliceRun>> runs;      // the gather thread's: the current parameter's
      // Gathers state s of jobs[j] into `out` (its merged, vocab-cut elements).
      auto gather = [&](size_t j, int s, Buffer* out) -> Status {
        const Job& job = jobs[j];
        if (s == 0) runs = PlanRuns(job.layout, job.p->local_shapes);
        uint8_t* dst = out->Reserve(static_cast<size_t>(job.layout.kept) * 4);
        for (int r = 0; r < disc.tp; ++r) {
          const std::vector<SliceRun>& rr = runs[static_cast<size_t>(r)];
          if (rr.empty()) continue;
          const bool add = job.layout.how == MergeLayout::kAverage && r > 0;
          if (!add && rr.size() <= kDirectRuns) {
            for (const SliceRun& x : rr) MEMENTO_RETURN_IF_ERROR(read_slice(job, r, s, x.from, x.n, dst + x.to * 4));
            continue;
          }
          const int64_t first = rr.front().from, span = rr.back().from + rr.back().n - first;
          uint8_t* buf = slice.Reserve(static_cast<size_t>(span) * 4);
          MEMENTO_RETURN_IF_ERROR(read_slice(job, r, s, first, span, buf));
          for (const SliceRun& x : rr) {
            const uint8_t* src = buf + (x.from - first) * 4;
            if (!add) {
              std::memcpy(dst + x.to * 4, src, static_cast<size_t>(x.n) * 4);
              continue;
            }
            for (int64_t i = 0; i < x.n; ++i) {
              float acc, v;
              std::memcpy(&acc, dst + (x.to + i) * 4, 4);
              std::memcpy(&v, src + i * 4, 4);
              acc += v;
              std::memcpy(dst + (x.to + i) * 4, &acc, 4);
            }
          }
        }
        if (job.layout.how == MergeLayout::kAverage) {
          const auto tp = static_cast<float>(disc.tp);
          for (int64_t i = 0; i < job.layout.kept; ++i) {
            float acc;
            std::memcpy(&acc, dst + i * 4, 4);
            acc /= tp;
            std::memcpy(dst + i * 4, &acc, 4);
          }
        }
        return Status::Ok();
      };
      Buffer merged[2];
      const size_t items = jobs.size() * 3;
      std::future<Status> next;
      if (items > 0) next = std::async(std::launch::async, gather, 0, 0, &merged[0]);
      for (size_t k = 0; k < items; ++k) {
        Status got = next.get();
        if (k + 1 < items) next = std::async(std::launch::async, gather, (k + 1) / 3, static_cast<int>((k + 1) % 3), &merged[(k + 1) % 2]);
        if (!got.ok()) return got;  // `next` waits for its gather on the way out
        const Job& job = jobs[k / 3];
        const Param& p = *job.p;
        const MergeKind& kind = job.kind;
        const int s = static_cast<int>(k % 3);
        if (s == 0) {
          PickleValuePtr pi = PyDict(false);
          switch (kind.kind) {
            case MergeKind::kSubParams: {
              // DeepSpeed's SubparamShape fields: the patterns, the shape with the sub-parameters'
              // sizes at partition_dim, partition_dim. Export writes it as a SubparamShape.
              PickleValuePtr sp = PyDict(false);
              std::vector<PickleValuePtr> sizes, shape, patterns;
              for (int64_t x : job.layout.sub_sizes) sizes.push_back(PyInt(x));
              for (size_t d = 0; d < job.layout.full_shape.size(); ++d) {
                shape.push_back(static_cast<int>(d) == kind.dim ? PyTuple(sizes) : PyInt(job.layout.full_shape[d]));
              }
              for (const std::string& t : kind.sub->patterns.text) patterns.push_back(PyStr(t));
              DictSet(sp.get(), "patterns", PyList(patterns));
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
          std::vector<UniversalSink::StateInfo> states;
          for (int st = 0; st < 3; ++st) {
            states.push_back({kStates[st], st == 0 ? p.name : p.name + "." + kStates[st], DType::kF32, job.layout.shape});
          }
          states.push_back({"step", p.name + ".step", DType::kF32, {1}});
          MEMENTO_RETURN_IF_ERROR(sink.BeginParam(p.name, std::move(states), SourceLayout(kind, disc.tp, disc.pp, disc.dp, stage)));
        }
        const size_t bytes = static_cast<size_t>(job.layout.kept) * 4;
        MEMENTO_RETURN_IF_ERROR(sink.AppendState(merged[k % 2].data(), bytes));
        progress_done += bytes;
        if (s == 2) {
          const auto step32 = static_cast<float>(optim[0][0].step);
          MEMENTO_RETURN_IF_ERROR(sink.AppendState(&step32, 4));
          MEMENTO_RETURN_IF_ERROR(sink.EndParam());
          if (options.convert.progress) options.convert.progress(std::min(progress_done, progress_total), progress_total);
        }
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

// The class DeepSpeed's ds_to_universal.py stores under 'sub_param_shape' (defined in
// deepspeed/checkpoint/universal_checkpoint.py; load_hp_checkpoint_state reads its attributes).
constexpr const char* kSubparamShapeClass = "deepspeed.checkpoint.universal_checkpoint.SubparamShape";

// A parameter's merge rule as DeepSpeed's universal files hold it: its plain entries, with
// 'sub_param_shape' (kept by the import as a dict of the fields) as a SubparamShape object.
Status ExportMergeRule(const std::string& where, const PickleValue& rule, PickleValue* to) {
  CopyEntries(&rule, to);
  const PickleValue* sp = rule.Get("sub_param_shape");
  if (sp == nullptr) return Status::Ok();
  PickleValuePtr obj = PyDataclass(kSubparamShapeClass);
  static const char* kFields[] = {"patterns", "shape", "partition_dim"};
  for (size_t i = 0; i < 3; ++i) {
    const PickleValue* f = sp->Field(kFields[i], i);
    PickleValuePtr c = f != nullptr ? PlainCopy(*f, 0) : nullptr;
    if (c == nullptr) return InvalidArgument(where + ": sub_param_shape has no plain field '" + kFields[i] + "'");
    DictSet(obj.get(), kFields[i], c);
  }
  for (auto& [k, v] : to->entries) {
    if (k->kind == K::kString && k->s == "sub_param_shape") v = obj;
  }
  if (to->Get("sub_param_shape") == nullptr) DictSet(to, "sub_param_shape", obj);
  return Status::Ok();
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
        MEMENTO_RETURN_IF_ERROR(ExportMergeRule(ucp_dir + ": blob '" + kInfoBlob + "', parameter '" + name + "'", *pi, top.get()));
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
