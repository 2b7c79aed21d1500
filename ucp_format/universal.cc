// The universal checkpoint: streaming consolidation from a native checkpoint (slabs of rows, one
// parameter per thread, every source byte CRC-checked in file order), the reader, and loading any
// saved state onto a new layout through the resharding engine (core/reshard.h).
#include "ucp_format/universal.h"

#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#include "core/crc.h"
#include "core/dtype.h"
#include "core/reshard.h"
#include "core/shard.h"
#include "core/utf8.h"
#include "proto/shard_convert.h"
#include "proto/version.h"
#include "ucp_format/native_checkpoint.h"
#include "ucp_format/safetensors.h"

namespace memento {
namespace {

using RepeatedCrcs = google::protobuf::RepeatedField<uint64_t>;

std::string Str(uint64_t v) { return std::to_string(v); }

std::string Join(const std::string& dir, const std::string& name) {
  if (!dir.empty() && dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// "<file>: tensor '<t>' [fragment <f> ]bytes <b>..<e>: <what>", as native VerifyProblem prints it.
std::string Problem(const std::string& file, const std::string& name, int32_t fragment, uint64_t begin, uint64_t end,
                    const std::string& what) {
  VerifyProblem p;
  p.file = file;
  p.tensor = name;
  p.fragment = fragment;
  p.begin = begin;
  p.end = end;
  p.what = what;
  return p.ToString();
}

// Whether a manifest's file name stays inside the checkpoint directory: relative, and no component
// empty, "." or "..". (A ".." inside a component, as FileNameFor writes for "a..b", is fine.)
bool IsRelativeInside(const std::string& file) {
  if (file.empty() || file[0] == '/') return false;
  for (size_t begin = 0; begin <= file.size();) {
    size_t end = file.find('/', begin);
    if (end == std::string::npos) end = file.size();
    const std::string part = file.substr(begin, end - begin);
    if (part.empty() || part == "." || part == "..") return false;
    begin = end + 1;
  }
  return true;
}

// A parameter name as a file name: [A-Za-z0-9._-] kept, anything else (and a leading '.') %XX.
std::string FileNameFor(const std::string& param) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  for (size_t i = 0; i < param.size(); ++i) {
    const auto c = static_cast<unsigned char>(param[i]);
    const bool plain = std::isalnum(c) || c == '_' || c == '-' || (c == '.' && i > 0);
    if (plain) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

// A contiguous run of bytes in a file, laid out as `spec` (local offsets count elements from the
// run's first byte). `spec.global_shape` is the source's (possibly padded) global shape.
struct Piece {
  int32_t rank = -1;        // source rank; -1 for a universal checkpoint
  std::string path;
  uint64_t file_offset = 0;
  uint64_t bytes = 0;
  uint64_t chunk_bytes = 0;
  const RepeatedCrcs* chunk_crcs = nullptr;
  ShardSpec spec;
  int32_t fragment = -1;    // for messages: the native fragment index when a rank has several runs
};

// One tensor of the source as pieces, with what the manifest records about it.
struct TensorSource {
  std::string name;                   // the tensor's name in the source
  DType dtype = DType::kInvalid;
  std::vector<int64_t> global_shape;  // the source's (padded) global shape
  std::vector<int64_t> logical_shape; // unpadded
  std::vector<Piece> pieces;
  bool average = false;
  std::string layout;                 // summary for the manifest
  int rule_index = -1;
};

std::vector<int64_t> ShapeOf(const google::protobuf::RepeatedField<int64_t>& r) { return {r.begin(), r.end()}; }

// Rows along dim 0 and elements per row of `shape` (a scalar is one row of one element).
std::pair<int64_t, int64_t> RowsOf(const std::vector<int64_t>& shape) {
  if (shape.empty()) return {1, 1};
  const int64_t rows = shape[0];
  int64_t row = 1;
  for (size_t d = 1; d < shape.size(); ++d) row *= shape[d];
  return {rows, row};
}

// A box (kind kBox) covering rows [r0, r1) of `shape`.
Fragment RowsBox(const std::vector<int64_t>& shape, int64_t r0, int64_t r1) {
  Fragment f;
  f.kind = Fragment::Kind::kBox;
  if (shape.empty()) return f;
  f.box.offsets.assign(shape.size(), 0);
  f.box.lengths = shape;
  f.box.offsets[0] = r0;
  f.box.lengths[0] = r1 - r0;
  return f;
}

// The part of `f` in rows below `rows` (row length `row` elements); numel 0 when none. The kept
// elements are a prefix of the fragment's run, so local offsets stay valid.
Fragment ClipRows(Fragment f, int64_t rows, int64_t row) {
  if (f.kind == Fragment::Kind::kBox) {
    if (f.box.offsets.empty()) return f;
    const int64_t end = std::min(f.box.offsets[0] + f.box.lengths[0], rows);
    f.box.lengths[0] = std::max<int64_t>(0, end - f.box.offsets[0]);
    if (f.box.lengths[0] == 0) f.box.offsets[0] = 0;
    return f;
  }
  const int64_t end = std::min(f.flat_begin + f.flat_length, rows * row);
  f.flat_length = std::max<int64_t>(0, end - f.flat_begin);
  if (f.flat_length == 0) f.flat_begin = 0;
  return f;
}

// Reads the bytes of one piece in ascending order, checking each CRC chunk when it completes; bytes
// skipped over are read and checked too, so every byte of the piece is checked once.
class SequentialReader {
 public:
  SequentialReader(ReadableFile* file, const Piece* piece, const std::string& name, uint64_t* bytes_read)
      : file_(file), piece_(piece), name_(name), bytes_read_(bytes_read) {}

  Status Open() {
    const uint64_t need = piece_->file_offset + piece_->bytes;
    if (file_->size() < need) {
      const uint64_t present = file_->size() > piece_->file_offset ? file_->size() - piece_->file_offset : 0;
      return DataLoss(Problem(piece_->path, name_, piece_->fragment, present, piece_->bytes, "truncated"));
    }
    return Status::Ok();
  }

  // Copies piece bytes [begin, end) to `dst`.
  Status Read(uint64_t begin, uint64_t end, uint8_t* dst) {
    if (begin < pos_) {  // already checked: read again without the CRC
      const uint64_t upto = std::min(end, pos_);
      MEMENTO_RETURN_IF_ERROR(file_->ReadAt(piece_->file_offset + begin, dst, static_cast<size_t>(upto - begin)));
      *bytes_read_ += upto - begin;
      dst += upto - begin;
      begin = upto;
    }
    if (begin >= end) return Status::Ok();
    MEMENTO_RETURN_IF_ERROR(Consume(begin, nullptr));
    return Consume(end, dst);
  }

  Status Finish() { return Consume(piece_->bytes, nullptr); }

 private:
  // Reads [pos_, end) into `dst` (or a scratch buffer when null), checking chunks.
  Status Consume(uint64_t end, uint8_t* dst) {
    const uint64_t chunk = piece_->chunk_bytes;
    while (pos_ < end) {
      const uint64_t chunk_end = std::min((pos_ / chunk + 1) * chunk, piece_->bytes);
      uint64_t n = std::min(end, chunk_end) - pos_;
      uint8_t* to = dst;
      if (to == nullptr) {
        n = std::min<uint64_t>(n, uint64_t{8} << 20);
        scratch_.resize(static_cast<size_t>(n));
        to = scratch_.data();
      }
      MEMENTO_RETURN_IF_ERROR(file_->ReadAt(piece_->file_offset + pos_, to, static_cast<size_t>(n)));
      *bytes_read_ += n;
      crc_ = Crc64(to, static_cast<size_t>(n), crc_);
      pos_ += n;
      if (dst != nullptr) dst += n;
      if (pos_ == chunk_end) {
        const uint64_t index = (pos_ - 1) / chunk;
        if (static_cast<int>(index) >= piece_->chunk_crcs->size() ||
            piece_->chunk_crcs->Get(static_cast<int>(index)) != crc_) {
          return DataLoss(Problem(piece_->path, name_, piece_->fragment, index * chunk, chunk_end, "CRC mismatch"));
        }
        crc_ = 0;
      }
    }
    return Status::Ok();
  }

  ReadableFile* file_;
  const Piece* piece_;
  const std::string& name_;
  uint64_t* bytes_read_;
  uint64_t pos_ = 0;
  uint64_t crc_ = 0;
  std::vector<uint8_t> scratch_;
};

// Open files by path, for one thread.
class FileCache {
 public:
  explicit FileCache(FileSystem* fs) : fs_(fs) {}
  Result<ReadableFile*> Get(const std::string& path) {
    auto it = files_.find(path);
    if (it != files_.end()) return it->second.get();
    if (files_.size() >= 64) files_.clear();
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> f, fs_->NewReadableFile(path));
    ReadableFile* raw = f.get();
    files_.emplace(path, std::move(f));
    return raw;
  }

 private:
  FileSystem* fs_;
  std::map<std::string, std::unique_ptr<ReadableFile>> files_;
};

// ---- the native checkpoint as tensor sources ---------------------------------------------------

struct NativeCheckpoint {
  proto::Manifest manifest;
  std::vector<proto::RankMetadata> metas;  // by ascending rank
  std::vector<std::string> data_paths;
};

Result<NativeCheckpoint> OpenNative(FileSystem* fs, const std::string& dir) {
  NativeCheckpoint nc;
  MEMENTO_ASSIGN_OR_RETURN(nc.manifest, ReadManifest(fs, dir));
  std::vector<int32_t> ranks;
  for (const proto::ManifestRank& r : nc.manifest.ranks()) ranks.push_back(r.rank());
  std::sort(ranks.begin(), ranks.end());
  for (int32_t r : ranks) {
    MEMENTO_ASSIGN_OR_RETURN(proto::RankMetadata meta, ReadRankMetadata(fs, dir, nc.manifest, r));
    nc.data_paths.push_back(Join(dir, meta.data_file()));
    nc.metas.push_back(std::move(meta));
  }
  return nc;
}

struct Holder {
  size_t rank_index;
  const proto::PersistedTensor* tensor;
  ShardSpec spec;
};

Piece PieceOfRun(const NativeCheckpoint& nc, const Holder& h, const proto::PersistedRun& run) {
  Piece p;
  p.rank = nc.metas[h.rank_index].rank();
  p.path = nc.data_paths[h.rank_index];
  p.file_offset = run.file_offset();
  p.bytes = run.bytes();
  p.chunk_bytes = run.chunk_bytes();
  p.chunk_crcs = &run.chunk_crcs();
  p.fragment = h.tensor->runs_size() > 1 ? run.fragment() : -1;
  return p;
}

// A tensor whose native metadata is complete: one piece per persisted run.
// Overlapping replica-0 pieces (the same elements saved by several ranks) mean the metadata is
// partial (each rank described its local tensor as a whole one), unless `allow_overlap` (a
// pipeline_replicated rule: tied copies on several stages).
Result<TensorSource> FromNativeMetadata(const NativeCheckpoint& nc, const std::string& name,
                                        const std::vector<Holder>& holders, bool allow_overlap) {
  TensorSource t;
  t.name = name;
  const Holder& first = holders.front();
  t.dtype = static_cast<DType>(first.tensor->dtype());
  t.global_shape = first.spec.global_shape;
  t.logical_shape = first.spec.original_shape.empty() ? first.spec.global_shape : first.spec.original_shape;
  int boxes = 0, flats = 0;
  for (const Holder& h : holders) {
    const int32_t rank = nc.metas[h.rank_index].rank();
    const int32_t first_rank = nc.metas[first.rank_index].rank();
    if (h.tensor->dtype() != first.tensor->dtype()) {
      return FailedPrecondition("tensor '" + name + "': rank " + std::to_string(first_rank) + " saved " +
                                std::string(DTypeName(t.dtype)) + ", rank " + std::to_string(rank) + " " +
                                std::string(DTypeName(static_cast<DType>(h.tensor->dtype()))));
    }
    if (h.spec.global_shape != first.spec.global_shape || h.spec.original_shape != first.spec.original_shape) {
      return FailedPrecondition("tensor '" + name + "': ranks " + std::to_string(first_rank) + " and " +
                                std::to_string(rank) + " disagree on its global shape (" +
                                ShapeString(first.spec.global_shape) + " vs " + ShapeString(h.spec.global_shape) +
                                "); its layout metadata is partial: add a pattern spec rule for it");
    }
    for (const proto::PersistedRun& run : h.tensor->runs()) {
      Piece p = PieceOfRun(nc, h, run);
      Fragment f = h.spec.fragments[static_cast<size_t>(run.fragment())];
      (f.kind == Fragment::Kind::kBox ? boxes : flats)++;
      f.local_offset = 0;
      p.spec.global_shape = h.spec.global_shape;
      p.spec.original_shape = h.spec.original_shape;
      p.spec.local_numel = f.numel();
      p.spec.fragments.push_back(std::move(f));
      t.pieces.push_back(std::move(p));
    }
  }
  int64_t held = 0;
  std::string ranks;
  for (const Piece& p : t.pieces) {
    held += p.spec.local_numel;
    if (ranks.find(" " + std::to_string(p.rank) + ",") == std::string::npos) ranks += " " + std::to_string(p.rank) + ",";
  }
  if (!allow_overlap && held > NumElements(t.global_shape)) {
    ranks.pop_back();
    return FailedPrecondition("tensor '" + name + "': ranks" + ranks + " saved " + std::to_string(held) +
                              " elements of replica 0 for a tensor of " + std::to_string(NumElements(t.global_shape)) +
                              " " + ShapeString(t.global_shape) +
                              ": its layout metadata is partial: add a pattern spec rule for it");
  }
  t.layout = "native metadata: " + std::to_string(boxes) + " box and " + std::to_string(flats) + " flat pieces";
  return t;
}

// Sizes of the `parts` parts of `n` as torch.tensor_split cuts it.
int64_t PartSize(int64_t n, int parts, int k) { return n / parts + (k < n % parts ? 1 : 0); }
int64_t PartOffset(int64_t n, int parts, int k) { return k * (n / parts) + std::min<int64_t>(k, n % parts); }

// A tensor rebuilt by pattern rule `rule_index` from per-rank (local, whole-tensor) metadata.
Result<TensorSource> FromRule(const NativeCheckpoint& nc, const PatternSpec& spec, int rule_index,
                              const std::string& name, const std::vector<Holder>& holders) {
  const proto::PatternRule& rule = spec.rule(rule_index);
  const std::string what = "tensor '" + name + "' (pattern spec rule " + std::to_string(rule_index) + " '" +
                           rule.pattern() + "', " + RuleKindString(rule) + ")";
  const int tp = spec.tp(), dp = spec.dp(), pp = spec.pp();
  if (nc.manifest.world_size() != tp * dp * pp) {
    return InvalidArgument(what + ": the pattern spec's source degrees tp " + std::to_string(tp) + " x dp " +
                           std::to_string(dp) + " x pp " + std::to_string(pp) + " do not make the checkpoint's world size " +
                           std::to_string(nc.manifest.world_size()));
  }
  // Local tensors of data-parallel replica 0, by pipeline stage and TP index.
  std::map<int, std::map<int, const Holder*>> by_stage;
  for (const Holder& h : holders) {
    const int32_t rank = nc.metas[h.rank_index].rank();
    const ShardSpec& s = h.spec;
    const bool whole = s.fragments.size() == 1 && s.fragments[0].kind == Fragment::Kind::kBox &&
                       s.fragments[0].local_offset == 0 && s.fragments[0].box.lengths == s.global_shape &&
                       s.original_shape.empty() && h.tensor->runs_size() == 1;
    if (!whole) {
      return FailedPrecondition(what + ": the rule rebuilds the layout from per-rank whole tensors, but rank " +
                                std::to_string(rank) + " saved the shard " + s.DebugString() +
                                ": its metadata is complete; drop the rule");
    }
    const int tp_index = rank % tp, dp_index = (rank / tp) % dp, pp_index = rank / (tp * dp);
    if (dp_index != 0) continue;
    by_stage[pp_index][tp_index] = &h;
  }
  if (by_stage.empty()) return FailedPrecondition(what + ": no rank of data-parallel replica 0 holds it");
  if (by_stage.size() > 1 && !rule.pipeline_replicated()) {
    return FailedPrecondition(what + ": pipeline stages " + std::to_string(by_stage.begin()->first) + " and " +
                              std::to_string(std::next(by_stage.begin())->first) +
                              " both hold it; mark the rule pipeline_replicated");
  }
  const std::map<int, const Holder*>& by_tp = by_stage.begin()->second;
  const Holder& first = *by_tp.begin()->second;
  TensorSource t;
  t.name = name;
  t.rule_index = rule_index;
  t.dtype = static_cast<DType>(first.tensor->dtype());
  const std::vector<int64_t> local0 = first.spec.global_shape;
  for (const auto& [k, h] : by_tp) {
    if (h->tensor->dtype() != first.tensor->dtype()) {
      return FailedPrecondition(what + ": TP ranks saved different dtypes");
    }
  }
  auto piece_of = [&](const Holder& h) {
    return PieceOfRun(nc, h, h.tensor->runs(0));
  };
  auto need_all_tp = [&]() -> Status {
    for (int k = 0; k < tp; ++k) {
      if (!by_tp.count(k)) {
        return FailedPrecondition(what + ": TP index " + std::to_string(k) + " of stage " +
                                  std::to_string(by_stage.begin()->first) + " saved no copy of it");
      }
    }
    return Status::Ok();
  };
  const std::string degrees = " over tp " + std::to_string(tp);
  // Scalar states (an optimizer's step) are taken whole from the first holder, whatever the rule.
  if (local0.empty() || rule.has_replicated() || rule.layout_case() == proto::PatternRule::LAYOUT_NOT_SET) {
    t.global_shape = t.logical_shape = local0;
    Piece p = piece_of(first);
    p.spec = WholeTensor(local0);
    t.pieces.push_back(std::move(p));
    t.layout = local0.empty() ? "scalar" : "replicated" + degrees;
    return t;
  }
  MEMENTO_RETURN_IF_ERROR(need_all_tp());
  if (rule.has_average()) {
    if (t.dtype != DType::kF32) {
      return NotSupported(what + ": averaging needs F32, the tensor is " + std::string(DTypeName(t.dtype)));
    }
    t.global_shape = t.logical_shape = local0;
    for (const auto& [k, h] : by_tp) {
      if (h->spec.global_shape != local0) {
        return FailedPrecondition(what + ": TP ranks hold different shapes " + ShapeString(local0) + " and " +
                                  ShapeString(h->spec.global_shape));
      }
      Piece p = piece_of(*h);
      p.spec = WholeTensor(local0);
      t.pieces.push_back(std::move(p));
    }
    t.average = true;
    t.layout = "averaged" + degrees;
    return t;
  }
  if (rule.has_split() || rule.has_vocab()) {
    const int dim = rule.has_split() ? rule.split().dim() : 0;
    if (static_cast<size_t>(dim) >= local0.size()) {
      return InvalidArgument(what + ": dim " + std::to_string(dim) + " is out of range for " + ShapeString(local0));
    }
    std::vector<int64_t> global = local0;
    global[static_cast<size_t>(dim)] = 0;
    for (const auto& [k, h] : by_tp) {
      std::vector<int64_t> a = h->spec.global_shape, b = local0;
      if (a.size() != b.size()) return FailedPrecondition(what + ": TP ranks hold tensors of different ranks");
      a[static_cast<size_t>(dim)] = b[static_cast<size_t>(dim)] = 0;
      if (a != b) {
        return FailedPrecondition(what + ": TP slices " + ShapeString(local0) + " and " +
                                  ShapeString(h->spec.global_shape) + " differ outside dim " + std::to_string(dim));
      }
      Piece p = piece_of(*h);
      Fragment f;
      f.box.offsets.assign(local0.size(), 0);
      f.box.lengths = h->spec.global_shape;
      f.box.offsets[static_cast<size_t>(dim)] = global[static_cast<size_t>(dim)];
      global[static_cast<size_t>(dim)] += h->spec.global_shape[static_cast<size_t>(dim)];
      p.spec.fragments.push_back(std::move(f));
      p.spec.local_numel = NumElements(h->spec.global_shape);
      t.pieces.push_back(std::move(p));
    }
    t.global_shape = t.logical_shape = global;
    if (rule.has_vocab()) {
      if (rule.vocab().original_size() > global[0]) {
        return InvalidArgument(what + ": original_size " + std::to_string(rule.vocab().original_size()) +
                               " exceeds the padded vocabulary of " + std::to_string(global[0]) + " rows");
      }
      t.logical_shape[0] = rule.vocab().original_size();
    }
    for (Piece& p : t.pieces) {
      p.spec.global_shape = t.global_shape;
      if (rule.has_vocab()) p.spec.original_shape = t.logical_shape;
    }
    t.layout = (rule.has_vocab() ? "vocab split dim 0" : "split dim " + std::to_string(dim)) + degrees;
    return t;
  }
  // sub_params along dim 0.
  const std::vector<int64_t> sizes(rule.sub_params().sizes().begin(), rule.sub_params().sizes().end());
  std::vector<int64_t> global = local0;
  global[0] = 0;
  for (int64_t s : sizes) global[0] += s;
  for (const auto& [k, h] : by_tp) {
    int64_t rows = 0;
    for (int64_t s : sizes) rows += PartSize(s, tp, k);
    std::vector<int64_t> want = global;
    want[0] = rows;
    if (h->spec.global_shape != want) {
      return FailedPrecondition(what + ": TP index " + std::to_string(k) + " holds " +
                                ShapeString(h->spec.global_shape) + ", its slices of sub-tensors " +
                                ShapeString(sizes) + " make " + ShapeString(want));
    }
    Piece p = piece_of(*h);
    p.spec.global_shape = global;
    p.spec.local_numel = NumElements(want);
    const int64_t row = RowsOf(global).second;
    int64_t sub_offset = 0, local = 0;
    for (int64_t s : sizes) {
      const int64_t n = PartSize(s, tp, k);
      if (n > 0) {
        Fragment f = RowsBox(global, sub_offset + PartOffset(s, tp, k), sub_offset + PartOffset(s, tp, k) + n);
        f.local_offset = local;
        local += n * row;
        p.spec.fragments.push_back(std::move(f));
      }
      sub_offset += s;
    }
    t.pieces.push_back(std::move(p));
  }
  t.global_shape = t.logical_shape = global;
  t.layout = "sub_params " + ShapeString(sizes) + " dim 0" + degrees;
  return t;
}

// Every tensor of the checkpoint as a source, with the rule that applied (counted in `rule_uses`).
Result<std::map<std::string, TensorSource>> NativeSources(const NativeCheckpoint& nc, const PatternSpec& spec,
                                                         std::vector<int64_t>* rule_uses) {
  std::map<std::string, std::vector<Holder>> by_name;
  for (size_t i = 0; i < nc.metas.size(); ++i) {
    for (const proto::PersistedTensor& t : nc.metas[i].tensors()) {
      MEMENTO_ASSIGN_OR_RETURN(ShardSpec s, FromProto(t.spec()));  // checked by ReadRankMetadata
      by_name[t.name()].push_back({i, &t, std::move(s)});
    }
  }
  rule_uses->assign(static_cast<size_t>(spec.rule_count()), 0);
  std::set<std::string> counted;
  std::map<std::string, TensorSource> out;
  for (const auto& [name, holders] : by_name) {
    std::string param, state;
    spec.SplitName(name, &param, &state);
    const int rule = spec.Match(param);
    if (rule >= 0 && counted.insert(param).second) ++(*rule_uses)[static_cast<size_t>(rule)];
    Result<TensorSource> t = rule >= 0 && spec.rule(rule).layout_case() != proto::PatternRule::LAYOUT_NOT_SET
                                 ? FromRule(nc, spec, rule, name, holders)
                                 : FromNativeMetadata(nc, name, holders, rule >= 0 && spec.rule(rule).pipeline_replicated());
    if (!t.ok()) return t.status();
    t->rule_index = rule;
    out.emplace(name, std::move(t).value());
  }
  return out;
}

Status CheckDeadRules(const PatternSpec& spec, const std::vector<int64_t>& uses,
                      const std::map<std::string, TensorSource>& sources, const std::string& dir) {
  if (!spec.strict()) return Status::Ok();
  for (int i = 0; i < spec.rule_count(); ++i) {
    if (uses[static_cast<size_t>(i)] > 0) continue;
    const proto::PatternRule& r = spec.rule(i);
    std::string why = "matches no parameter of " + dir;
    for (const auto& [name, t] : sources) {
      std::string param, state;
      spec.SplitName(name, &param, &state);
      std::vector<int> all = spec.AllMatches(param);
      if (std::find(all.begin(), all.end(), i) != all.end()) {
        why = "every parameter it matches (e.g. '" + param + "') is taken by rule " + std::to_string(all.front()) +
              " first";
        break;
      }
    }
    return InvalidArgument("pattern spec rule " + std::to_string(i) + " ('" + r.pattern() + "', " +
                           RuleKindString(r) + ") " + why +
                           " (strict: a rule that applies to nothing is an error; set allow_unmatched_rules: true "
                           "to allow it)");
  }
  return Status::Ok();
}

// ---- consolidation -----------------------------------------------------------------------------

// Streams the consolidated tensor `t` (its logical shape, row-major) through `sink`, in slabs of
// about `slab_bytes` (at least one row). Each piece is read once, in file order, CRC-checked.
template <typename Sink>
Status Consolidate(const TensorSource& t, FileCache* files, uint64_t slab_bytes, uint64_t* bytes_read, Sink&& sink) {
  const size_t width = DTypeSize(t.dtype);
  const auto [rows, row] = RowsOf(t.logical_shape);
  if (rows == 0 || row == 0) return Status::Ok();
  std::vector<std::unique_ptr<SequentialReader>> readers;
  std::vector<const ShardSpec*> specs;
  for (const Piece& p : t.pieces) {
    MEMENTO_ASSIGN_OR_RETURN(ReadableFile * f, files->Get(p.path));
    readers.push_back(std::make_unique<SequentialReader>(f, &p, t.name, bytes_read));
    MEMENTO_RETURN_IF_ERROR(readers.back()->Open());
    specs.push_back(&p.spec);
  }
  const int64_t slab_rows =
      std::max<int64_t>(1, static_cast<int64_t>(slab_bytes / (static_cast<uint64_t>(row) * width)));
  std::vector<uint8_t> slab, staging, sum;
  for (int64_t r0 = 0; r0 < rows; r0 += slab_rows) {
    const int64_t r1 = std::min(rows, r0 + slab_rows);
    ShardSpec target;
    target.global_shape = t.global_shape;
    target.fragments.push_back(RowsBox(t.global_shape, r0, r1));
    target.local_numel = (r1 - r0) * row;
    slab.assign(static_cast<size_t>(target.local_numel) * width, 0);
    const std::string rows_text = "rows " + std::to_string(r0) + ".." + std::to_string(r1);
    auto read_runs = [&](const ReshardPlan& plan) -> Status {
      // Per source, the byte range it contributes, read in one go (sources in ascending order).
      std::map<int32_t, std::pair<int64_t, int64_t>> ranges;
      for (const CopyRun& c : plan.runs) {
        auto [it, fresh] = ranges.try_emplace(c.source, c.source_offset, c.source_offset + c.elements);
        if (!fresh) {
          it->second.first = std::min(it->second.first, c.source_offset);
          it->second.second = std::max(it->second.second, c.source_offset + c.elements);
        }
      }
      // A source with one run (a row split, a flat range) is read straight into the slab; the
      // others (column splits: a run per row) through a staging buffer.
      std::map<int32_t, int> runs_of;
      for (const CopyRun& c : plan.runs) ++runs_of[c.source];
      std::map<int32_t, size_t> at;
      size_t total = 0;
      for (const auto& [s, r] : ranges) {
        if (runs_of[s] == 1) continue;
        at[s] = total;
        total += static_cast<size_t>(r.second - r.first) * width;
      }
      staging.resize(total);
      for (const CopyRun& c : plan.runs) {
        if (runs_of[c.source] != 1) continue;
        MEMENTO_RETURN_IF_ERROR(readers[static_cast<size_t>(c.source)]->Read(
            static_cast<uint64_t>(c.source_offset) * width, static_cast<uint64_t>(c.source_offset + c.elements) * width,
            slab.data() + static_cast<size_t>(c.target_offset) * width));
      }
      for (const auto& [s, r] : ranges) {
        if (runs_of[s] == 1) continue;
        MEMENTO_RETURN_IF_ERROR(readers[static_cast<size_t>(s)]->Read(
            static_cast<uint64_t>(r.first) * width, static_cast<uint64_t>(r.second) * width, staging.data() + at[s]));
      }
      for (const CopyRun& c : plan.runs) {
        if (runs_of[c.source] == 1) continue;
        std::memcpy(slab.data() + static_cast<size_t>(c.target_offset) * width,
                    staging.data() + at[c.source] + static_cast<size_t>(c.source_offset - ranges[c.source].first) * width,
                    static_cast<size_t>(c.elements) * width);
      }
      return Status::Ok();
    };
    if (!t.average) {
      Result<ReshardPlan> plan = PlanReshard(target, specs);
      if (!plan.ok()) return plan.status().WithContext("tensor '" + t.name + "'");
      if (!plan->complete()) {
        return FailedPrecondition("tensor '" + t.name + "': the checkpoint covers " +
                                  std::to_string(plan->covered_elements) + " of " +
                                  std::to_string(plan->target_elements) + " elements of " + rows_text +
                                  " (a rank's shard is missing)");
      }
      MEMENTO_RETURN_IF_ERROR(read_runs(*plan));
    } else {
      sum.assign(slab.size(), 0);
      auto* acc = reinterpret_cast<float*>(sum.data());
      const auto* part = reinterpret_cast<const float*>(slab.data());
      for (size_t s = 0; s < specs.size(); ++s) {
        Result<ReshardPlan> plan = PlanReshard(target, {specs[s]});
        if (!plan.ok()) return plan.status().WithContext("tensor '" + t.name + "'");
        ReshardPlan one = *plan;
        for (CopyRun& c : one.runs) c.source = static_cast<int32_t>(s);
        MEMENTO_RETURN_IF_ERROR(read_runs(one));
        for (int64_t i = 0; i < target.local_numel; ++i) acc[i] += part[i];
      }
      const float n = static_cast<float>(specs.size());
      for (int64_t i = 0; i < target.local_numel; ++i) acc[i] /= n;
      std::swap(slab, sum);
    }
    MEMENTO_RETURN_IF_ERROR(sink(slab.data(), slab.size()));
  }
  for (auto& r : readers) MEMENTO_RETURN_IF_ERROR(r->Finish());
  return Status::Ok();
}

struct ParamPlan {
  std::string name;
  std::vector<const TensorSource*> states;  // value state first
  std::vector<std::string> state_names;
  uint64_t bytes = 0;
};

uint64_t LogicalBytes(const TensorSource& t) {
  return static_cast<uint64_t>(NumElements(t.logical_shape)) * DTypeSize(t.dtype);
}

// Writes params/<param>.safetensors (in `tmp`) and fills the manifest entry.
Status WriteParam(FileSystem* fs, const std::string& tmp, const ParamPlan& plan, const ConvertOptions& options,
                  FileCache* files, uint64_t* bytes_read, const std::function<void(uint64_t)>& advance,
                  proto::UniversalParam* out) {
  SafetensorsHeader header;
  header.SetMetadata("format", "memento-universal");
  header.SetMetadata("param", plan.name);
  for (size_t i = 0; i < plan.states.size(); ++i) {
    MEMENTO_RETURN_IF_ERROR(header.Add(plan.state_names[i], plan.states[i]->dtype, plan.states[i]->logical_shape));
  }
  const std::string rel = "params/" + FileNameFor(plan.name) + ".safetensors";
  const std::string path = Join(tmp, rel);
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, fs->NewWritableFile(path, options.write));
  const std::string head = header.Serialize();
  MEMENTO_RETURN_IF_ERROR(file->Append(head.data(), head.size()));
  out->set_name(plan.name);
  for (size_t i = 0; i < plan.states.size(); ++i) {
    const TensorSource& t = *plan.states[i];
    const SafetensorsEntry& e = header.entries()[i];
    proto::UniversalTensor* ut = out->add_states();
    ut->set_state(plan.state_names[i]);
    ut->set_source_name(t.name);
    ut->set_dtype(static_cast<int32_t>(t.dtype));
    for (int64_t d : t.logical_shape) ut->add_shape(d);
    ut->set_file(rel);
    ut->set_key(plan.state_names[i]);
    ut->set_data_offset(head.size() + e.begin);
    ut->set_bytes(e.end - e.begin);
    ut->set_chunk_bytes(options.crc_chunk_bytes);
    uint64_t crc = 0, chunk_crc = 0, in_chunk = 0, written = 0;
    Status st = Consolidate(t, files, options.slab_bytes, bytes_read, [&](const uint8_t* data, size_t n) -> Status {
      MEMENTO_RETURN_IF_ERROR(file->Append(data, n));
      crc = Crc64(data, n, crc);
      for (size_t at = 0; at < n;) {
        const size_t take = static_cast<size_t>(std::min<uint64_t>(n - at, options.crc_chunk_bytes - in_chunk));
        chunk_crc = Crc64(data + at, take, chunk_crc);
        in_chunk += take;
        at += take;
        if (in_chunk == options.crc_chunk_bytes) {
          ut->add_chunk_crcs(chunk_crc);
          chunk_crc = 0;
          in_chunk = 0;
        }
      }
      written += n;
      advance(n);
      return Status::Ok();
    });
    MEMENTO_RETURN_IF_ERROR(st);
    if (in_chunk > 0) ut->add_chunk_crcs(chunk_crc);
    if (written != ut->bytes()) {
      return Internal("tensor '" + t.name + "': wrote " + Str(written) + " bytes, expected " + Str(ut->bytes()));
    }
    ut->set_crc64(crc);
  }
  return file->Close();
}

void DescribeSource(const TensorSource& t, const PatternSpec& spec, proto::UniversalParam* out) {
  out->set_source_layout(t.layout);
  out->set_rule_index(t.rule_index);
  if (t.rule_index >= 0) out->set_rule_pattern(spec.rule(t.rule_index).pattern());
  out->set_consolidation(t.average ? "average" : "box-intersection");
  if (t.global_shape != t.logical_shape) {
    for (int64_t d : t.global_shape) out->add_padded_shape(d);
  }
  for (const Piece& p : t.pieces) {
    proto::SourceShard* s = out->add_source_shards();
    s->set_rank(p.rank);
    ToProto(p.spec, s->mutable_spec());
  }
}

std::string ParentDir(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const size_t slash = p.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : p.substr(0, slash);
}

std::string BaseName(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const size_t slash = p.rfind('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

Result<ConvertSummary> ConvertInto(FileSystem* fs, const std::string& native_dir, const std::string& tmp,
                                   const std::string& out_dir, const ConvertOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  const PatternSpec default_spec;
  const PatternSpec& spec = options.pattern != nullptr ? *options.pattern : default_spec;
  MEMENTO_ASSIGN_OR_RETURN(NativeCheckpoint nc, OpenNative(fs, native_dir));
  std::vector<int64_t> uses;
  MEMENTO_ASSIGN_OR_RETURN(auto sources, NativeSources(nc, spec, &uses));
  MEMENTO_RETURN_IF_ERROR(CheckDeadRules(spec, uses, sources, native_dir));

  // Parameters with their states, value first.
  std::map<std::string, ParamPlan> by_param;
  for (const auto& [name, t] : sources) {
    std::string param, state;
    spec.SplitName(name, &param, &state);
    ParamPlan& p = by_param[param];
    p.name = param;
    for (const std::string& s : p.state_names) {
      if (s == state) return Internal("tensor '" + name + "': state '" + state + "' of '" + param + "' twice");
    }
    const bool value = state == spec.value_state();
    p.states.insert(value ? p.states.begin() : p.states.end(), &t);
    p.state_names.insert(value ? p.state_names.begin() : p.state_names.end(), state);
    p.bytes += LogicalBytes(t);
  }
  std::vector<ParamPlan*> order;
  ConvertSummary summary;
  uint64_t total = 0;
  for (auto& [name, p] : by_param) {
    order.push_back(&p);
    total += p.bytes;
    for (const TensorSource* t : p.states) summary.largest_tensor_bytes = std::max(summary.largest_tensor_bytes, LogicalBytes(*t));
  }
  // Largest first: the last thread to finish does not start a big tensor late.
  std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->bytes > b->bytes; });

  MEMENTO_RETURN_IF_ERROR(fs->CreateDirs(Join(tmp, "params")));
  std::vector<proto::UniversalParam> entries(order.size());
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  Status first_error;           // GUARDED_BY(mu)
  uint64_t done = 0;            // GUARDED_BY(mu)
  uint64_t bytes_read = 0;      // GUARDED_BY(mu)
  auto advance = [&](uint64_t n) {
    std::lock_guard<std::mutex> lock(mu);
    done += n;
    if (options.progress) options.progress(done, total);
  };
  auto worker = [&] {
    FileCache files(fs);
    uint64_t read_here = 0;
    while (!failed.load()) {
      const size_t i = next.fetch_add(1);
      if (i >= order.size()) break;
      Status st = WriteParam(fs, tmp, *order[i], options, &files, &read_here, advance, &entries[i]);
      if (st.ok()) {
        DescribeSource(*order[i]->states.front(), spec, &entries[i]);
        continue;
      }
      std::lock_guard<std::mutex> lock(mu);
      if (first_error.ok()) first_error = st;
      failed = true;
    }
    std::lock_guard<std::mutex> lock(mu);
    bytes_read += read_here;
  };
  const int threads = std::max(1, std::min<int>(options.threads, static_cast<int>(order.size())));
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  if (!first_error.ok()) return first_error;

  proto::UniversalManifest manifest;
  manifest.set_format_version(kUniversalFormatVersion);
  manifest.set_library_version(std::string(kLibraryVersion));
  manifest.set_created_unix_ms(NowUnixMs());
  proto::UniversalSource* src = manifest.mutable_source();
  src->set_kind("native");
  src->set_path(native_dir);
  src->set_job_id(nc.manifest.job_id());
  src->set_step(nc.manifest.step());
  src->set_world_size(nc.manifest.world_size());
  src->set_format_version(nc.manifest.format_version());
  if (options.pattern != nullptr) *src->mutable_pattern_spec() = spec.proto();
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return a.name() < b.name(); });
  for (proto::UniversalParam& e : entries) *manifest.add_params() = std::move(e);

  // Blobs, per source rank, in one file.
  SafetensorsHeader blob_header;
  struct BlobRef {
    size_t rank_index;
    const proto::PersistedBlob* blob;
  };
  std::vector<BlobRef> blobs;
  for (size_t i = 0; i < nc.metas.size(); ++i) {
    for (const proto::PersistedBlob& b : nc.metas[i].blobs()) {
      MEMENTO_RETURN_IF_ERROR(blob_header.Add("rank-" + std::to_string(nc.metas[i].rank()) + "/" + b.name(), DType::kU8,
                                              {static_cast<int64_t>(b.run().bytes())}));
      blobs.push_back({i, &b});
    }
  }
  if (!blobs.empty()) {
    const std::string head = blob_header.Serialize();
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file,
                             fs->NewWritableFile(Join(tmp, "blobs.safetensors"), options.write));
    MEMENTO_RETURN_IF_ERROR(file->Append(head.data(), head.size()));
    FileCache files(fs);
    for (size_t k = 0; k < blobs.size(); ++k) {
      const BlobRef& b = blobs[k];
      Piece p;
      p.rank = nc.metas[b.rank_index].rank();
      p.path = nc.data_paths[b.rank_index];
      p.file_offset = b.blob->run().file_offset();
      p.bytes = b.blob->run().bytes();
      p.chunk_bytes = b.blob->run().chunk_bytes();
      p.chunk_crcs = &b.blob->run().chunk_crcs();
      const std::string what = "blob '" + b.blob->name() + "'";
      MEMENTO_ASSIGN_OR_RETURN(ReadableFile * f, files.Get(p.path));
      SequentialReader reader(f, &p, what, &bytes_read);
      MEMENTO_RETURN_IF_ERROR(reader.Open());
      std::vector<uint8_t> data(static_cast<size_t>(p.bytes));
      MEMENTO_RETURN_IF_ERROR(reader.Read(0, p.bytes, data.data()));
      MEMENTO_RETURN_IF_ERROR(reader.Finish());
      MEMENTO_RETURN_IF_ERROR(file->Append(data.data(), data.size()));
      const SafetensorsEntry& e = blob_header.entries()[k];
      proto::UniversalBlob* ub = manifest.add_blobs();
      ub->set_rank(p.rank);
      ub->set_name(b.blob->name());
      ub->set_file("blobs.safetensors");
      ub->set_key(e.key);
      ub->set_data_offset(head.size() + e.begin);
      ub->set_bytes(p.bytes);
      ub->set_crc64(Crc64(data.data(), data.size()));
      total += p.bytes;
    }
    MEMENTO_RETURN_IF_ERROR(file->Close());
  }
  manifest.set_total_bytes(total);

  std::string json;
  google::protobuf::util::JsonPrintOptions json_options;
  json_options.add_whitespace = true;
  json_options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(manifest, &json, json_options).ok()) {
    return Internal("cannot print the universal manifest as JSON");
  }
  MEMENTO_ASSIGN_OR_RETURN(const std::string pb, SerializeUniversalManifest(manifest));
  MEMENTO_RETURN_IF_ERROR(WriteFileAtomically(fs, Join(tmp, kUniversalManifestJsonName), json));
  MEMENTO_RETURN_IF_ERROR(WriteFileAtomically(fs, Join(tmp, kUniversalManifestName), pb));
  MEMENTO_RETURN_IF_ERROR(fs->SyncDir(Join(tmp, "params")));
  MEMENTO_RETURN_IF_ERROR(fs->SyncDir(tmp));
  // The commit point.
  MEMENTO_RETURN_IF_ERROR(fs->Rename(tmp, out_dir));
  MEMENTO_RETURN_IF_ERROR(fs->SyncDir(ParentDir(out_dir)));

  summary.out_dir = out_dir;
  summary.step = nc.manifest.step();
  summary.source_world_size = nc.manifest.world_size();
  summary.params = manifest.params_size();
  for (const proto::UniversalParam& p : manifest.params()) {
    summary.tensors += p.states_size();
    for (const proto::UniversalTensor& t : p.states()) summary.tensor_bytes += t.bytes();
  }
  summary.blobs = manifest.blobs_size();
  summary.bytes_read = bytes_read;
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

// ---- loading onto a layout ---------------------------------------------------------------------

// Sources for the registered tensors of a universal checkpoint, by source name.
Result<std::map<std::string, TensorSource>> UniversalSources(const std::string& dir,
                                                            const proto::UniversalManifest& m) {
  std::map<std::string, TensorSource> out;
  for (const proto::UniversalParam& p : m.params()) {
    for (const proto::UniversalTensor& ut : p.states()) {
      TensorSource t;
      t.name = ut.source_name();
      MEMENTO_ASSIGN_OR_RETURN(t.dtype, DTypeFromInt(ut.dtype()));
      t.global_shape = t.logical_shape = ShapeOf(ut.shape());
      Piece piece;
      piece.path = Join(dir, ut.file());
      piece.file_offset = ut.data_offset();
      piece.bytes = ut.bytes();
      piece.chunk_bytes = ut.chunk_bytes();
      piece.chunk_crcs = &ut.chunk_crcs();
      piece.spec = WholeTensor(t.logical_shape);
      if (piece.bytes != static_cast<uint64_t>(NumElements(t.logical_shape)) * DTypeSize(t.dtype) ||
          (piece.bytes > 0 && (piece.chunk_bytes == 0 ||
                               static_cast<uint64_t>(ut.chunk_crcs_size()) !=
                                   (piece.bytes + piece.chunk_bytes - 1) / piece.chunk_bytes))) {
        return DataLoss(Join(dir, kUniversalManifestName) + ": tensor '" + t.name + "': sizes or chunk CRCs disagree");
      }
      t.pieces.push_back(std::move(piece));
      out.emplace(t.name, std::move(t));
    }
  }
  return out;
}

// Copies piece bytes [begin, end) to dst through a one-chunk cache, CRC-checking each chunk read.
class ChunkReader {
 public:
  explicit ChunkReader(FileSystem* fs) : files_(fs) {}

  Status Copy(const Piece& p, const std::string& name, uint64_t begin, uint64_t end, uint8_t* dst) {
    if (begin >= end) return Status::Ok();
    MEMENTO_ASSIGN_OR_RETURN(ReadableFile * file, files_.Get(p.path));
    for (uint64_t c = begin / p.chunk_bytes; c * p.chunk_bytes < end; ++c) {
      const uint64_t chunk_begin = c * p.chunk_bytes;
      const uint64_t chunk_end = std::min(chunk_begin + p.chunk_bytes, p.bytes);
      if (!(cached_path_ == p.path && cached_offset_ == p.file_offset && cached_index_ == c)) {
        cached_path_.clear();
        if (p.file_offset + chunk_end > file->size()) {
          const uint64_t present = file->size() > p.file_offset ? file->size() - p.file_offset : 0;
          return DataLoss(Problem(p.path, name, p.fragment, std::max(chunk_begin, present), p.bytes, "truncated"));
        }
        chunk_.resize(static_cast<size_t>(chunk_end - chunk_begin));
        MEMENTO_RETURN_IF_ERROR(file->ReadAt(p.file_offset + chunk_begin, chunk_.data(), chunk_.size()));
        if (Crc64(chunk_.data(), chunk_.size()) != p.chunk_crcs->Get(static_cast<int>(c))) {
          return DataLoss(Problem(p.path, name, p.fragment, chunk_begin, chunk_end, "CRC mismatch"));
        }
        cached_path_ = p.path;
        cached_offset_ = p.file_offset;
        cached_index_ = c;
      }
      const uint64_t from = std::max(begin, chunk_begin);
      const uint64_t to = std::min(end, chunk_end);
      std::memcpy(dst + (from - begin), chunk_.data() + (from - chunk_begin), static_cast<size_t>(to - from));
    }
    return Status::Ok();
  }

 private:
  FileCache files_;
  std::vector<uint8_t> chunk_;
  std::string cached_path_;
  uint64_t cached_offset_ = 0;
  uint64_t cached_index_ = 0;
};

// Fills one registered tensor of `layout` from `t`.
Status FillTensor(const TensorSource& t, const proto::TensorRecord& rec, const proto::RankRecord& layout,
                  ChunkReader* reader, uint8_t* slot) {
  const std::string rank_name = "rank " + std::to_string(layout.rank());
  const std::string tname = "tensor '" + rec.name() + "'";
  MEMENTO_ASSIGN_OR_RETURN(DType dtype, DTypeFromInt(rec.dtype()));
  Result<ShardSpec> target = FromProto(rec.spec());
  if (!target.ok()) return target.status().WithContext(rank_name + " " + tname);
  MEMENTO_RETURN_IF_ERROR(target->Validate().WithContext(rank_name + " " + tname));
  if (dtype != t.dtype) {
    return FailedPrecondition(tname + ": the checkpoint holds " + std::string(DTypeName(t.dtype)) + ", " + rank_name +
                              " registered " + std::string(DTypeName(dtype)));
  }
  const std::vector<int64_t> logical = target->original_shape.empty() ? target->global_shape : target->original_shape;
  if (logical != t.logical_shape) {
    return FailedPrecondition(tname + ": the checkpoint's logical shape " + ShapeString(t.logical_shape) +
                              " differs from " + rank_name + "'s " + ShapeString(logical));
  }
  const uint64_t width = DTypeSize(dtype);
  const uint64_t region = static_cast<uint64_t>(target->local_numel) * width;
  if (rec.slot_offset() > layout.slot_bytes() || region > layout.slot_bytes() - rec.slot_offset()) {
    return InvalidArgument(rank_name + " " + tname + ": slot bytes " + Str(rec.slot_offset()) + ".." +
                           Str(rec.slot_offset() + region) + " exceed the slot's " + Str(layout.slot_bytes()));
  }
  uint8_t* base = slot + rec.slot_offset();
  // Padding rows (past the logical rows) are zero; the rest comes from the pieces.
  const auto [rows, row] = RowsOf(logical);
  ShardSpec clipped = *target;
  clipped.original_shape.clear();
  for (Fragment& f : clipped.fragments) {
    std::memset(base + static_cast<uint64_t>(f.local_offset) * width, 0, static_cast<size_t>(f.numel()) * width);
    f = ClipRows(f, rows, row);
  }
  std::vector<ShardSpec> sources;
  for (const Piece& p : t.pieces) {
    ShardSpec s = p.spec;
    s.global_shape = target->global_shape;
    s.original_shape.clear();
    for (Fragment& f : s.fragments) f = ClipRows(f, rows, row);
    sources.push_back(std::move(s));
  }
  std::vector<const ShardSpec*> ptrs;
  for (const ShardSpec& s : sources) ptrs.push_back(&s);
  Result<ReshardPlan> plan = PlanReshard(clipped, ptrs);
  if (!plan.ok()) return plan.status().WithContext(rank_name + " " + tname);
  if (!plan->complete()) {
    return FailedPrecondition(tname + ": the checkpoint covers " + std::to_string(plan->covered_elements) + " of " +
                              std::to_string(plan->target_elements) + " elements of " + rank_name + "'s shard");
  }
  std::vector<CopyRun> copies = plan->runs;
  std::sort(copies.begin(), copies.end(), [](const CopyRun& a, const CopyRun& b) {
    return std::pair(a.source, a.source_offset) < std::pair(b.source, b.source_offset);
  });
  for (const CopyRun& c : copies) {
    const Piece& p = t.pieces[static_cast<size_t>(c.source)];
    const uint64_t begin = static_cast<uint64_t>(c.source_offset) * width;
    MEMENTO_RETURN_IF_ERROR(reader->Copy(p, t.name, begin, begin + static_cast<uint64_t>(c.elements) * width,
                                         base + static_cast<uint64_t>(c.target_offset) * width));
  }
  return Status::Ok();
}

void StoreU64(uint64_t v, uint8_t* p) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

Status CheckBlobSlot(const proto::BlobRecord& b, const proto::RankRecord& layout, const std::string& what) {
  if (b.slot_offset() > layout.slot_bytes() || layout.slot_bytes() - b.slot_offset() < 8 ||
      b.capacity() > layout.slot_bytes() - b.slot_offset() - 8) {
    return InvalidArgument(what + ": slot bytes " + Str(b.slot_offset()) + ".." + Str(b.slot_offset() + 8 + b.capacity()) +
                           " exceed the slot's " + Str(layout.slot_bytes()));
  }
  return Status::Ok();
}

}  // namespace

Result<ConvertSummary> ConvertNativeToUniversal(FileSystem* fs, const std::string& native_dir,
                                                const std::string& out_dir, const ConvertOptions& options) {
  if (options.threads < 1 || options.slab_bytes == 0 || options.crc_chunk_bytes == 0) {
    return InvalidArgument("convert: threads, slab_bytes and crc_chunk_bytes must be positive");
  }
  if (fs->Exists(out_dir)) return AlreadyExists(out_dir + " already exists; the universal checkpoint needs a new path");
  const std::string tmp = Join(ParentDir(out_dir), "." + BaseName(out_dir) + ".tmp-" + std::to_string(::getpid()));
  MEMENTO_RETURN_IF_ERROR(fs->RemoveAll(tmp));
  MEMENTO_RETURN_IF_ERROR(fs->CreateDirs(tmp));
  Result<ConvertSummary> out = ConvertInto(fs, native_dir, tmp, out_dir, options);
  if (!out.ok()) fs->RemoveAll(tmp).IgnoreError();
  return out;
}

Result<std::string> SerializeUniversalManifest(const proto::UniversalManifest& m) {
  auto refuse = [](const std::string& what) {
    return InvalidArgument(what + " is not UTF-8: a universal manifest (Protobuf strings) cannot hold it");
  };
  for (const proto::UniversalParam& p : m.params()) {
    if (!IsUtf8(p.name())) return refuse("parameter name '" + p.name() + "'");
    for (const proto::UniversalTensor& t : p.states()) {
      if (!IsUtf8(t.source_name())) return refuse("tensor name '" + t.source_name() + "'");
      if (!IsUtf8(t.state())) return refuse("parameter '" + p.name() + "': state name '" + t.state() + "'");
    }
  }
  for (const proto::UniversalBlob& b : m.blobs()) {
    if (!IsUtf8(b.name())) return refuse("blob name '" + b.name() + "'");
  }
  std::string pb;
  proto::UniversalManifest back;
  if (!m.SerializeToString(&pb) || !back.ParseFromString(pb)) {
    return refuse("a string of the manifest (source path, job, pattern spec)");
  }
  return pb;
}

Result<proto::UniversalManifest> ReadUniversalManifest(FileSystem* fs, const std::string& dir) {
  const std::string path = Join(dir, kUniversalManifestName);
  if (!fs->Exists(path)) return NotFound(dir + " is not a universal checkpoint: it has no " + kUniversalManifestName);
  MEMENTO_ASSIGN_OR_RETURN(std::string contents, ReadFileToString(fs, path));
  proto::UniversalManifest m;
  if (!m.ParseFromString(contents)) return DataLoss(path + ": malformed (not a UniversalManifest record)");
  if (m.format_version() != kUniversalFormatVersion) {
    return FailedPrecondition(path + ": format version " + std::to_string(m.format_version()) +
                              ", this build reads version " + std::to_string(kUniversalFormatVersion));
  }
  // Readers compare offset + bytes with a file's size and count a shape's elements: neither may
  // wrap around.
  auto past_2_64 = [](uint64_t offset, uint64_t bytes) { return bytes > UINT64_MAX - offset; };
  for (const proto::UniversalParam& p : m.params()) {
    for (const proto::UniversalTensor& t : p.states()) {
      if (!IsRelativeInside(t.file())) {
        return DataLoss(path + ": tensor '" + t.source_name() + "' names file '" + t.file() + "'");
      }
      if (past_2_64(t.data_offset(), t.bytes())) {
        return DataLoss(path + ": tensor '" + t.source_name() + "': " + std::to_string(t.bytes()) + " bytes at " +
                        std::to_string(t.data_offset()) + " end past 2^64");
      }
      int64_t numel = 1;
      bool fits = true;
      for (int64_t d : t.shape()) fits = fits && d >= 0 && !__builtin_mul_overflow(numel, d, &numel);
      uint64_t bytes = 0;
      if (!fits || __builtin_mul_overflow(static_cast<uint64_t>(numel), DTypeSize(static_cast<DType>(t.dtype())), &bytes)) {
        return DataLoss(path + ": tensor '" + t.source_name() + "': shape " +
                        ShapeString(std::vector<int64_t>(t.shape().begin(), t.shape().end())) +
                        " has a negative dim or more elements than 64 bits can count");
      }
    }
  }
  // Blob files are joined to `dir` on load just like tensor files: the same check.
  for (const proto::UniversalBlob& b : m.blobs()) {
    if (!IsRelativeInside(b.file())) {
      return DataLoss(path + ": blob '" + b.name() + "' of rank " + std::to_string(b.rank()) + " names file '" +
                      b.file() + "'");
    }
    if (past_2_64(b.data_offset(), b.bytes())) {
      return DataLoss(path + ": blob '" + b.name() + "' of rank " + std::to_string(b.rank()) + ": " +
                      std::to_string(b.bytes()) + " bytes at " + std::to_string(b.data_offset()) + " end past 2^64");
    }
  }
  return m;
}

Result<std::vector<uint8_t>> ReadUniversalTensor(FileSystem* fs, const std::string& dir,
                                                 const proto::UniversalManifest& manifest, const std::string& param,
                                                 const std::string& state) {
  for (const proto::UniversalParam& p : manifest.params()) {
    if (p.name() != param) continue;
    for (const proto::UniversalTensor& t : p.states()) {
      if (t.state() != state) continue;
      const std::string path = Join(dir, t.file());
      MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> f, fs->NewReadableFile(path));
      if (f->size() < t.data_offset() + t.bytes()) {
        return DataLoss(Problem(path, t.key(), -1, f->size() > t.data_offset() ? f->size() - t.data_offset() : 0,
                                t.bytes(), "truncated"));
      }
      std::vector<uint8_t> out(static_cast<size_t>(t.bytes()));
      MEMENTO_RETURN_IF_ERROR(f->ReadAt(t.data_offset(), out.data(), out.size()));
      if (Crc64(out.data(), out.size()) != t.crc64()) {
        return DataLoss(Problem(path, t.key(), -1, 0, t.bytes(), "CRC mismatch"));
      }
      return out;
    }
    return NotFound(dir + ": parameter '" + param + "' has no state '" + state + "'");
  }
  return NotFound(dir + ": no parameter '" + param + "'");
}

Result<std::vector<std::string>> VerifyUniversal(FileSystem* fs, const std::string& dir) {
  MEMENTO_ASSIGN_OR_RETURN(proto::UniversalManifest m, ReadUniversalManifest(fs, dir));
  std::vector<std::string> problems;
  std::vector<uint8_t> buffer;
  auto check = [&](const std::string& rel, const std::string& key, uint64_t offset, uint64_t bytes, uint64_t crc) -> Status {
    const std::string path = Join(dir, rel);
    if (!fs->Exists(path)) {
      problems.push_back(path + ": missing file");
      return Status::Ok();
    }
    Result<std::unique_ptr<SafetensorsFile>> st = SafetensorsFile::Open(fs, path);
    if (!st.ok()) {
      problems.push_back(st.status().message());
      return Status::Ok();
    }
    Result<const SafetensorsEntry*> e = (*st)->Find(key);
    if (!e.ok() || (*st)->data_start() + (*e)->begin != offset || (*e)->end - (*e)->begin != bytes) {
      problems.push_back(path + ": tensor '" + key + "': the safetensors header disagrees with the manifest");
      return Status::Ok();
    }
    uint64_t c = 0;
    for (uint64_t at = 0; at < bytes;) {
      const uint64_t n = std::min<uint64_t>(bytes - at, uint64_t{16} << 20);
      buffer.resize(static_cast<size_t>(n));
      MEMENTO_RETURN_IF_ERROR((*st)->file()->ReadAt(offset + at, buffer.data(), buffer.size()));
      c = Crc64(buffer.data(), buffer.size(), c);
      at += n;
    }
    if (c != crc) problems.push_back(Problem(path, key, -1, 0, bytes, "CRC mismatch"));
    return Status::Ok();
  };
  for (const proto::UniversalParam& p : m.params()) {
    for (const proto::UniversalTensor& t : p.states()) {
      MEMENTO_RETURN_IF_ERROR(check(t.file(), t.key(), t.data_offset(), t.bytes(), t.crc64()));
    }
  }
  for (const proto::UniversalBlob& b : m.blobs()) {
    MEMENTO_RETURN_IF_ERROR(check(b.file(), b.key(), b.data_offset(), b.bytes(), b.crc64()));
  }
  return problems;
}

Status LoadRankResharded(FileSystem* fs, const std::string& dir, const proto::RankRecord& layout, uint8_t* slot) {
  const int32_t my_rank = layout.rank();
  const std::string rank_name = "rank " + std::to_string(my_rank);
  std::map<std::string, TensorSource> sources;
  proto::UniversalManifest um;
  NativeCheckpoint nc;
  const bool universal = fs->Exists(Join(dir, kUniversalManifestName));
  if (universal) {
    MEMENTO_ASSIGN_OR_RETURN(um, ReadUniversalManifest(fs, dir));
    MEMENTO_ASSIGN_OR_RETURN(sources, UniversalSources(dir, um));
  } else {
    MEMENTO_ASSIGN_OR_RETURN(nc, OpenNative(fs, dir));
    std::vector<int64_t> uses;
    MEMENTO_ASSIGN_OR_RETURN(sources, NativeSources(nc, PatternSpec(), &uses));
  }
  ChunkReader reader(fs);
  for (const proto::TensorRecord& rec : layout.tensors()) {
    auto it = sources.find(rec.name());
    if (it == sources.end()) {
      return NotFound("tensor '" + rec.name() + "' of " + rank_name + " is not in the checkpoint " + dir);
    }
    MEMENTO_RETURN_IF_ERROR(FillTensor(it->second, rec, layout, &reader, slot));
  }
  for (const proto::BlobRecord& b : layout.blobs()) {
    const std::string bname = "blob '" + b.name() + "' of " + rank_name;
    MEMENTO_RETURN_IF_ERROR(CheckBlobSlot(b, layout, bname));
    Piece p;
    std::vector<int32_t> saved_ranks;
    bool found = false;
    if (universal) {
      std::set<int32_t> ranks;
      for (const proto::UniversalBlob& ub : um.blobs()) {
        ranks.insert(ub.rank());
        if (ub.rank() != my_rank || ub.name() != b.name()) continue;
        p.path = Join(dir, ub.file());
        p.file_offset = ub.data_offset();
        p.bytes = ub.bytes();
        found = true;
        MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> f, fs->NewReadableFile(p.path));
        if (f->size() < p.file_offset + p.bytes) {
          return DataLoss(Problem(p.path, b.name(), -1, 0, p.bytes, "truncated"));
        }
        std::vector<uint8_t> data(static_cast<size_t>(p.bytes));
        MEMENTO_RETURN_IF_ERROR(f->ReadAt(p.file_offset, data.data(), data.size()));
        if (Crc64(data.data(), data.size()) != ub.crc64()) {
          return DataLoss(Problem(p.path, ub.key(), -1, 0, p.bytes, "CRC mismatch"));
        }
        if (p.bytes > b.capacity()) {
          return FailedPrecondition(bname + ": the checkpoint holds " + Str(p.bytes) + " bytes, more than its capacity " +
                                    Str(b.capacity()));
        }
        uint8_t* dst = slot + b.slot_offset();
        std::memcpy(dst + 8, data.data(), data.size());
        StoreU64(p.bytes, dst);
        std::memset(dst + 8 + p.bytes, 0, static_cast<size_t>(b.capacity() - p.bytes));
      }
      saved_ranks.assign(ranks.begin(), ranks.end());
    } else {
      for (size_t i = 0; i < nc.metas.size(); ++i) {
        saved_ranks.push_back(nc.metas[i].rank());
        if (nc.metas[i].rank() != my_rank) continue;
        for (const proto::PersistedBlob& pb : nc.metas[i].blobs()) {
          if (pb.name() != b.name()) continue;
          p.path = nc.data_paths[i];
          p.file_offset = pb.run().file_offset();
          p.bytes = pb.run().bytes();
          p.chunk_bytes = pb.run().chunk_bytes();
          p.chunk_crcs = &pb.run().chunk_crcs();
          found = true;
          if (p.bytes > b.capacity()) {
            return FailedPrecondition(bname + ": the checkpoint holds " + Str(p.bytes) +
                                      " bytes, more than its capacity " + Str(b.capacity()));
          }
          uint8_t* dst = slot + b.slot_offset();
          MEMENTO_RETURN_IF_ERROR(reader.Copy(p, b.name(), 0, p.bytes, dst + 8));
          StoreU64(p.bytes, dst);
          std::memset(dst + 8 + p.bytes, 0, static_cast<size_t>(b.capacity() - p.bytes));
        }
      }
    }
    if (!found) {
      const bool has_rank = std::find(saved_ranks.begin(), saved_ranks.end(), my_rank) != saved_ranks.end();
      return NotFound(bname + " cannot be mapped: per-rank blobs follow the rank-number rule (rank r's blob comes "
                      "from saved rank r), and the checkpoint " + dir +
                      (has_rank ? " has no such blob for " + rank_name
                                : " holds blobs of " + std::to_string(saved_ranks.size()) + " ranks, none of " +
                                      rank_name));
    }
  }
  return Status::Ok();
}

}  // namespace memento
