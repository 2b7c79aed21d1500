// The native persisted checkpoint (docs/formats/native-checkpoint.md): writing a rank's files,
// committing and reading the manifest, listing, verifying, and restoring a rank through the
// resharding engine. Memory stays bounded by one CRC chunk per call.
#include "ucp_format/native_checkpoint.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <thread>
#include <utility>

#include "core/crc.h"
#include "core/dtype.h"
#include "core/reshard.h"
#include "core/shard.h"
#include "proto/shard_convert.h"
#include "proto/version.h"

namespace memento {
namespace {

constexpr uint64_t kAlignment = 4096;
// A reader refuses larger CRC chunks: it holds one chunk in memory.
constexpr uint64_t kMaxChunkBytes = uint64_t{1} << 30;

std::string Str(uint64_t v) { return std::to_string(v); }

std::string Join(const std::string& dir, const std::string& name) {
  if (!dir.empty() && dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

uint64_t ChunkCount(uint64_t bytes, uint64_t chunk_bytes) {
  return chunk_bytes == 0 ? 0 : (bytes + chunk_bytes - 1) / chunk_bytes;
}

// A name the manifest gives for a file of the checkpoint: a plain name inside the directory.
bool IsPlainName(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos;
}

// Appends runs to a rank's data file: zero padding to 4 KiB, pieces of `piece_bytes`, throttled. A run's
// bytes are the slot's, unchanged until WriteRankFiles returns (after Close), so they go through
// AppendStable: where aligned, the file writes them from the slot, behind this thread.
class RunWriter {
 public:
  RunWriter(WritableFile* file, double bytes_per_s, uint64_t piece_bytes, std::function<void()> yield = nullptr)
      : file_(file),
        bytes_per_s_(bytes_per_s),
        piece_bytes_(std::max<uint64_t>(piece_bytes, 4096)),
        yield_(std::move(yield)),
        start_(std::chrono::steady_clock::now()) {}

  // Writes `n` bytes as one run at the next 4 KiB-aligned offset, with its CRCs per `chunk_bytes`.
  // Each piece is handed to the file before its CRC is computed, so that the CRC of a piece
  // overlaps the write of the ones before it.
  // With `known` (CRCs of exactly these bytes per `chunk_bytes`), the run takes them and computes none.
  Status WriteRun(const uint8_t* data, uint64_t n, int32_t fragment, uint64_t chunk_bytes,
                  proto::PersistedRun* run, const proto::RegionCrc* known = nullptr) {
    MEMENTO_RETURN_IF_ERROR(Align());
    run->set_fragment(fragment);
    run->set_file_offset(file_->size());
    run->set_bytes(n);
    run->set_chunk_bytes(chunk_bytes);
    if (known != nullptr) *run->mutable_chunk_crcs() = known->chunk_crcs();
    uint64_t crc = 0;
    uint64_t chunk_end = std::min(chunk_bytes, n);  // run offset where the current chunk ends
    for (uint64_t off = 0; off < n;) {
      if (yield_) yield_();
      const uint64_t piece_end = off + std::min(n - off, piece_bytes_);
      MEMENTO_RETURN_IF_ERROR(file_->AppendStable(data + off, static_cast<size_t>(piece_end - off)));
      for (uint64_t at = off; known == nullptr && at < piece_end;) {
        const uint64_t end = std::min(piece_end, chunk_end);
        crc = Crc64(data + at, static_cast<size_t>(end - at), crc);
        at = end;
        if (at == chunk_end) {
          run->add_chunk_crcs(crc);
          crc = 0;
          chunk_end = std::min(chunk_end + chunk_bytes, n);
        }
      }
      written_ += piece_end - off;
      off = piece_end;
      Throttle();
    }
    return Status::Ok();
  }

 private:
  Status Align() {
    static const uint8_t kZeros[kAlignment] = {};
    const uint64_t pad = (kAlignment - file_->size() % kAlignment) % kAlignment;
    if (pad == 0) return Status::Ok();
    written_ += pad;
    return file_->Append(kZeros, pad);
  }

  void Throttle() {
    if (bytes_per_s_ <= 0) return;
    const auto due = start_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                  std::chrono::duration<double>(static_cast<double>(written_) / bytes_per_s_));
    std::this_thread::sleep_until(due);
  }

  WritableFile* file_;
  double bytes_per_s_;
  uint64_t piece_bytes_;
  std::function<void()> yield_;
  std::chrono::steady_clock::time_point start_;
  uint64_t written_ = 0;
};

uint64_t LoadU64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void StoreU64(uint64_t v, uint8_t* p) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// Checks a run of a metadata record against its data file's size and its own CRC list.
Status CheckRun(const proto::PersistedRun& run, uint64_t data_bytes, const std::string& what) {
  if (run.bytes() > 0 && (run.chunk_bytes() == 0 || run.chunk_bytes() > kMaxChunkBytes)) {
    return DataLoss(what + ": chunk size " + Str(run.chunk_bytes()) + " is not in 1.." + Str(kMaxChunkBytes));
  }
  const uint64_t chunks = ChunkCount(run.bytes(), run.chunk_bytes());
  if (static_cast<uint64_t>(run.chunk_crcs_size()) != chunks) {
    return DataLoss(what + ": " + Str(static_cast<uint64_t>(run.chunk_crcs_size())) + " chunk CRCs for " +
                    Str(run.bytes()) + " bytes in chunks of " + Str(run.chunk_bytes()));
  }
  if (run.file_offset() > data_bytes || run.bytes() > data_bytes - run.file_offset()) {
    return DataLoss(what + ": run at " + Str(run.file_offset()) + " of " + Str(run.bytes()) +
                    " bytes ends past the data file's " + Str(data_bytes) + " bytes");
  }
  return Status::Ok();
}

// Checks what the readers rely on: dtypes, specs, runs inside the data file, each run the bytes of
// a replica-0 fragment.
Status CheckRankMetadata(const proto::RankMetadata& meta, const std::string& path) {
  for (const proto::PersistedTensor& t : meta.tensors()) {
    const std::string what = path + ": tensor '" + t.name() + "'";
    Result<DType> dtype = DTypeFromInt(t.dtype());
    if (!dtype.ok()) return DataLoss(what + ": " + dtype.status().message());
    Result<ShardSpec> spec = FromProto(t.spec());
    if (!spec.ok()) return DataLoss(what + ": " + spec.status().message());
    Status valid = spec->Validate();
    if (!valid.ok()) return DataLoss(what + ": " + valid.message());
    const uint64_t width = DTypeSize(*dtype);
    for (const proto::PersistedRun& run : t.runs()) {
      if (run.fragment() < 0 || static_cast<size_t>(run.fragment()) >= spec->fragments.size()) {
        return DataLoss(what + ": run names fragment " + std::to_string(run.fragment()) + " of " +
                        Str(spec->fragments.size()));
      }
      const Fragment& f = spec->fragments[static_cast<size_t>(run.fragment())];
      if (f.replica_id != 0) {
        return DataLoss(what + ": run of fragment " + std::to_string(run.fragment()) + " with replica id " +
                        std::to_string(f.replica_id));
      }
      uint64_t fragment_bytes = 0;
      if (__builtin_mul_overflow(static_cast<uint64_t>(f.numel()), width, &fragment_bytes)) {
        return DataLoss(what + ": fragment " + std::to_string(run.fragment()) + " of " + Str(static_cast<uint64_t>(f.numel())) +
                        " elements of " + Str(width) + " bytes is larger than 64 bits can count");
      }
      if (run.bytes() != fragment_bytes) {
        return DataLoss(what + ": run of fragment " + std::to_string(run.fragment()) + " holds " +
                        Str(run.bytes()) + " bytes, the fragment " + Str(fragment_bytes));
      }
      MEMENTO_RETURN_IF_ERROR(CheckRun(run, meta.data_bytes(), what));
    }
  }
  for (const proto::PersistedBlob& b : meta.blobs()) {
    MEMENTO_RETURN_IF_ERROR(CheckRun(b.run(), meta.data_bytes(), path + ": blob '" + b.name() + "'"));
  }
  return Status::Ok();
}

const proto::ManifestRank* FindRank(const proto::Manifest& manifest, int32_t rank) {
  for (const proto::ManifestRank& r : manifest.ranks()) {
    if (r.rank() == rank) return &r;
  }
  return nullptr;
}

// Parses and checks metadata bytes read from `path` for the manifest entry `entry`.
Result<proto::RankMetadata> ParseRankMetadata(const std::string& contents, const std::string& path,
                                              const proto::Manifest& manifest, const proto::ManifestRank& entry) {
  if (Crc64(contents.data(), contents.size()) != entry.meta_crc()) return DataLoss(path + ": metadata CRC mismatch");
  proto::RankMetadata meta;
  if (!meta.ParseFromString(contents)) return DataLoss(path + ": malformed metadata (not a RankMetadata record)");
  if (meta.format_version() != kNativeFormatVersion) {
    return FailedPrecondition(path + ": format version " + std::to_string(meta.format_version()) +
                              ", this build reads version " + std::to_string(kNativeFormatVersion));
  }
  if (meta.rank() != entry.rank() || meta.step() != manifest.step()) {
    return DataLoss(path + ": metadata of rank " + std::to_string(meta.rank()) + " step " +
                    std::to_string(meta.step()) + ", the manifest says rank " + std::to_string(entry.rank()) +
                    " step " + std::to_string(manifest.step()));
  }
  if (meta.data_bytes() != entry.data_bytes() || meta.data_file() != entry.data_file()) {
    return DataLoss(path + ": data file " + meta.data_file() + " of " + Str(meta.data_bytes()) +
                    " bytes, the manifest says " + entry.data_file() + " of " + Str(entry.data_bytes()));
  }
  MEMENTO_RETURN_IF_ERROR(CheckRankMetadata(meta, path));
  return meta;
}

// Byte range of chunk `chunk` within `run`.
std::pair<uint64_t, uint64_t> ChunkRange(const proto::PersistedRun& run, uint64_t chunk) {
  const uint64_t begin = chunk * run.chunk_bytes();
  return {begin, std::min(begin + run.chunk_bytes(), run.bytes())};
}

// Reads chunk `chunk` of `run` into `buffer`. False when the file ends before the chunk does.
Result<bool> ReadChunkBytes(ReadableFile* file, const proto::PersistedRun& run, uint64_t chunk,
                            std::vector<uint8_t>* buffer) {
  const auto [begin, end] = ChunkRange(run, chunk);
  if (run.file_offset() + end > file->size()) return false;
  buffer->resize(static_cast<size_t>(end - begin));
  MEMENTO_RETURN_IF_ERROR(file->ReadAt(run.file_offset() + begin, buffer->data(), buffer->size()));
  return true;
}

bool ChunkCrcMatches(const proto::PersistedRun& run, uint64_t chunk, const std::vector<uint8_t>& buffer) {
  return Crc64(buffer.data(), buffer.size()) == run.chunk_crcs(static_cast<int>(chunk));
}

std::string ProblemString(const std::string& file, const std::string& name, bool blob, int32_t fragment,
                          uint64_t begin, uint64_t end, const std::string& what) {
  VerifyProblem p;
  p.file = file;
  p.tensor = name;
  p.blob = blob;
  p.fragment = fragment;
  p.begin = begin;
  p.end = end;
  p.what = what;
  return p.ToString();
}

}  // namespace

std::string JobDir(const std::string& root, const std::string& job) { return Join(root, job); }

std::string CheckpointDir(const std::string& root, const std::string& job, int64_t step) {
  return Join(JobDir(root, job), "step-" + std::to_string(step));
}

std::string DataFileName(int32_t rank) { return "rank-" + std::to_string(rank) + ".data"; }
std::string MetaFileName(int32_t rank) { return "rank-" + std::to_string(rank) + ".meta"; }

Result<proto::ManifestRank> WriteRankFiles(FileSystem* fs, const std::string& dir, const std::string& job_id,
                                           int64_t step, const RankImage& image, const PersistOptions& options) {
  if (image.layout == nullptr || image.slot == nullptr) {
    return InvalidArgument("rank " + std::to_string(image.rank) + ": no layout or slot to persist");
  }
  if (options.crc_chunk_bytes == 0 || options.crc_chunk_bytes > kMaxChunkBytes) {
    return InvalidArgument("crc_chunk_bytes " + Str(options.crc_chunk_bytes) + " is not in 1.." + Str(kMaxChunkBytes));
  }
  const proto::RankRecord& layout = *image.layout;
  const std::string rank_name = "rank " + std::to_string(image.rank);
  MEMENTO_RETURN_IF_ERROR(fs->CreateDirs(dir));

  proto::RankMetadata meta;
  meta.set_format_version(kNativeFormatVersion);
  meta.set_job_id(job_id);
  meta.set_step(step);
  meta.set_rank(image.rank);
  meta.set_world_size(image.world_size);
  meta.set_data_file(DataFileName(image.rank));

  const std::string data_path = Join(dir, meta.data_file());
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> data, fs->NewWritableFile(data_path, options.write));
  RunWriter writer(data.get(), options.bandwidth_bytes_per_s, options.piece_bytes, options.yield);

  // The capture's CRCs of whole tensor regions, by slot offset, where their chunking is this file's.
  std::map<uint64_t, const proto::RegionCrc*> known;
  if (image.region_crcs != nullptr) {
    for (const proto::RegionCrc& r : *image.region_crcs) {
      if (r.chunk_bytes() == options.crc_chunk_bytes && r.bytes() > 0 &&
          static_cast<uint64_t>(r.chunk_crcs_size()) == ChunkCount(r.bytes(), r.chunk_bytes())) {
        known[r.offset()] = &r;
      }
    }
  }
  for (const proto::TensorRecord& t : layout.tensors()) {
    const std::string what = rank_name + " tensor '" + t.name() + "'";
    MEMENTO_ASSIGN_OR_RETURN(DType dtype, DTypeFromInt(t.dtype()));
    Result<ShardSpec> spec = FromProto(t.spec());
    if (!spec.ok()) return spec.status().WithContext(what);
    MEMENTO_RETURN_IF_ERROR(spec->Validate().WithContext(what));
    const uint64_t width = DTypeSize(dtype);
    const uint64_t region = static_cast<uint64_t>(spec->local_numel) * width;
    if (t.slot_offset() > layout.slot_bytes() || region > layout.slot_bytes() - t.slot_offset()) {
      return InvalidArgument(what + ": slot bytes " + Str(t.slot_offset()) + ".." + Str(t.slot_offset() + region) +
                             " exceed the slot's " + Str(layout.slot_bytes()));
    }
    proto::PersistedTensor* pt = meta.add_tensors();
    pt->set_name(t.name());
    pt->set_dtype(t.dtype());
    *pt->mutable_spec() = t.spec();
    for (size_t i = 0; i < spec->fragments.size(); ++i) {
      const Fragment& f = spec->fragments[i];
      if (f.replica_id != 0 || f.numel() == 0) continue;
      const uint64_t begin = t.slot_offset() + static_cast<uint64_t>(f.local_offset) * width;
      const uint64_t bytes = static_cast<uint64_t>(f.numel()) * width;
      auto k = known.find(begin);
      const proto::RegionCrc* crcs = k != known.end() && k->second->bytes() == bytes ? k->second : nullptr;
      MEMENTO_RETURN_IF_ERROR(writer.WriteRun(image.slot + begin, bytes, static_cast<int32_t>(i),
                                              options.crc_chunk_bytes, pt->add_runs(), crcs));
    }
  }
  for (const proto::BlobRecord& b : layout.blobs()) {
    const std::string what = rank_name + " blob '" + b.name() + "'";
    if (b.slot_offset() > layout.slot_bytes() || layout.slot_bytes() - b.slot_offset() < 8 ||
        b.capacity() > layout.slot_bytes() - b.slot_offset() - 8) {
      return InvalidArgument(what + ": slot bytes " + Str(b.slot_offset()) + ".." +
                             Str(b.slot_offset() + 8 + b.capacity()) + " exceed the slot's " +
                             Str(layout.slot_bytes()));
    }
    const uint8_t* src = image.slot + b.slot_offset();
    const uint64_t length = LoadU64(src);
    if (length > b.capacity()) {
      return DataLoss(what + ": saved length " + Str(length) + " exceeds its capacity " + Str(b.capacity()));
    }
    proto::PersistedBlob* pb = meta.add_blobs();
    pb->set_name(b.name());
    MEMENTO_RETURN_IF_ERROR(writer.WriteRun(src + 8, length, -1, options.crc_chunk_bytes, pb->mutable_run()));
  }
  meta.set_data_bytes(data->size());
  MEMENTO_RETURN_IF_ERROR(data->Close());

  std::string contents;
  if (!meta.SerializeToString(&contents)) return Internal(rank_name + ": cannot serialize its metadata");
  proto::ManifestRank entry;
  entry.set_rank(image.rank);
  entry.set_meta_file(MetaFileName(image.rank));
  entry.set_data_file(meta.data_file());
  entry.set_data_bytes(meta.data_bytes());
  entry.set_meta_crc(Crc64(contents.data(), contents.size()));

  WriteOptions meta_options = options.write;
  meta_options.direct_io = false;  // a small record: not worth the alignment
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> meta_file,
                           fs->NewWritableFile(Join(dir, entry.meta_file()), meta_options));
  MEMENTO_RETURN_IF_ERROR(meta_file->Append(contents.data(), contents.size()));
  MEMENTO_RETURN_IF_ERROR(meta_file->Sync());
  MEMENTO_RETURN_IF_ERROR(meta_file->Close());
  MEMENTO_RETURN_IF_ERROR(fs->SyncDir(dir));
  return entry;
}

proto::Manifest BuildManifest(const std::string& job_id, int64_t step, int32_t world_size,
                              std::vector<proto::ManifestRank> ranks) {
  std::sort(ranks.begin(), ranks.end(),
            [](const proto::ManifestRank& a, const proto::ManifestRank& b) { return a.rank() < b.rank(); });
  proto::Manifest m;
  m.set_format_version(kNativeFormatVersion);
  m.set_job_id(job_id);
  m.set_step(step);
  m.set_world_size(world_size);
  m.set_created_unix_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count());
  m.set_library_version(kLibraryVersion);
  uint64_t total = 0;
  for (proto::ManifestRank& r : ranks) {
    total += r.data_bytes();
    *m.add_ranks() = std::move(r);
  }
  m.set_total_bytes(total);
  return m;
}

Status CommitManifest(FileSystem* fs, const std::string& dir, const proto::Manifest& manifest) {
  std::string contents;
  if (!manifest.SerializeToString(&contents)) return Internal(dir + ": cannot serialize the manifest");
  return WriteFileAtomically(fs, Join(dir, "manifest"), contents);
}

Result<proto::Manifest> ReadManifest(FileSystem* fs, const std::string& dir) {
  const std::string path = Join(dir, "manifest");
  Result<std::string> contents = ReadFileToString(fs, path);
  if (!contents.ok()) {
    if (contents.status().code() == StatusCode::kNotFound) {
      return NotFound(dir + " has no manifest: not a committed checkpoint");
    }
    return contents.status();
  }
  proto::Manifest m;
  if (!m.ParseFromString(*contents)) return DataLoss(path + ": malformed manifest (not a Manifest record)");
  if (m.format_version() == 0) return DataLoss(path + ": malformed manifest (no format version)");
  if (m.format_version() != kNativeFormatVersion) {
    return FailedPrecondition(path + ": format version " + std::to_string(m.format_version()) +
                              ", this build reads version " + std::to_string(kNativeFormatVersion));
  }
  if (m.world_size() <= 0 || m.ranks_size() != m.world_size()) {
    return DataLoss(path + ": malformed manifest (" + std::to_string(m.ranks_size()) + " ranks for world size " +
                    std::to_string(m.world_size()) + ")");
  }
  std::vector<bool> seen(static_cast<size_t>(m.world_size()), false);
  for (const proto::ManifestRank& r : m.ranks()) {
    if (r.rank() < 0 || r.rank() >= m.world_size() || seen[static_cast<size_t>(r.rank())]) {
      return DataLoss(path + ": malformed manifest (rank " + std::to_string(r.rank()) + " out of range or repeated)");
    }
    seen[static_cast<size_t>(r.rank())] = true;
    if (!IsPlainName(r.meta_file()) || !IsPlainName(r.data_file())) {
      return DataLoss(path + ": malformed manifest (rank " + std::to_string(r.rank()) + " names files '" +
                      r.meta_file() + "' and '" + r.data_file() + "')");
    }
  }
  return m;
}

Result<proto::RankMetadata> ReadRankMetadata(FileSystem* fs, const std::string& dir, const proto::Manifest& manifest,
                                             int32_t rank) {
  const proto::ManifestRank* entry = FindRank(manifest, rank);
  if (entry == nullptr) {
    return NotFound(Join(dir, "manifest") + " has no rank " + std::to_string(rank) + " (world size " +
                    std::to_string(manifest.world_size()) + ")");
  }
  const std::string path = Join(dir, entry->meta_file());
  MEMENTO_ASSIGN_OR_RETURN(std::string contents, ReadFileToString(fs, path));
  return ParseRankMetadata(contents, path, manifest, *entry);
}

Result<std::vector<CheckpointInfo>> ListCheckpoints(FileSystem* fs, const std::string& job_dir) {
  MEMENTO_ASSIGN_OR_RETURN(std::vector<std::string> names, fs->ListDir(job_dir));
  std::vector<CheckpointInfo> out;
  for (const std::string& name : names) {
    if (name.size() <= 5 || name.compare(0, 5, "step-") != 0 || name.size() > 5 + 18) continue;
    if (!std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    if (name.size() > 6 && name[5] == '0') continue;  // not a name CheckpointDir writes
    CheckpointInfo info;
    info.step = std::stoll(name.substr(5));
    info.dir = Join(job_dir, name);
    Result<std::vector<std::string>> files = fs->ListDir(info.dir);
    if (!files.ok()) continue;  // not a directory
    Result<proto::Manifest> manifest = ReadManifest(fs, info.dir);
    if (manifest.ok()) {
      info.committed = true;
      info.bytes = manifest->total_bytes();
      info.ranks = manifest->world_size();
    } else {
      info.uncommitted_reason = manifest.status().message();
      for (const std::string& f : *files) {
        const bool data = f.size() > 10 && f.compare(0, 5, "rank-") == 0 && f.compare(f.size() - 5, 5, ".data") == 0;
        const bool meta = f.size() > 10 && f.compare(0, 5, "rank-") == 0 && f.compare(f.size() - 5, 5, ".meta") == 0;
        if (meta) ++info.ranks;
        if (!data) continue;
        Result<uint64_t> size = fs->FileSize(Join(info.dir, f));
        if (size.ok()) info.bytes += *size;
      }
    }
    out.push_back(std::move(info));
  }
  std::sort(out.begin(), out.end(), [](const CheckpointInfo& a, const CheckpointInfo& b) { return a.step < b.step; });
  return out;
}

std::string VerifyProblem::ToString() const {
  std::string s = file + ": ";
  if (!tensor.empty()) {
    s += (blob ? "blob '" : "tensor '") + tensor + "' ";
    if (fragment >= 0) s += "fragment " + std::to_string(fragment) + " ";
    s += "bytes " + Str(begin) + ".." + Str(end) + ": ";
  }
  return s + what;
}

Result<std::vector<VerifyProblem>> VerifyCheckpoint(FileSystem* fs, const std::string& dir) {
  return VerifyCheckpoint(fs, dir, nullptr);
}

Result<std::vector<VerifyProblem>> VerifyCheckpoint(FileSystem* fs, const std::string& dir, VerifyStats* stats,
                                                    const VerifyProgress& progress) {
  MEMENTO_ASSIGN_OR_RETURN(proto::Manifest manifest, ReadManifest(fs, dir));
  std::vector<const proto::ManifestRank*> entries;
  for (const proto::ManifestRank& r : manifest.ranks()) entries.push_back(&r);
  std::sort(entries.begin(), entries.end(), [](auto* a, auto* b) { return a->rank() < b->rank(); });

  std::vector<VerifyProblem> problems;
  auto file_problem = [&](const std::string& file, std::string what) {
    VerifyProblem p;
    p.file = file;
    p.what = std::move(what);
    problems.push_back(std::move(p));
  };

  // Metadata first, so that progress knows the total.
  struct RankToCheck {
    std::string data_path;
    proto::RankMetadata meta;
  };
  std::vector<RankToCheck> ranks;
  uint64_t total = 0;
  VerifyStats local_stats;
  std::set<std::string> tensor_names;
  for (const proto::ManifestRank* entry : entries) {
    const std::string meta_path = Join(dir, entry->meta_file());
    if (!fs->Exists(meta_path)) {
      file_problem(meta_path, "missing file");
      continue;
    }
    MEMENTO_ASSIGN_OR_RETURN(std::string contents, ReadFileToString(fs, meta_path));
    Result<proto::RankMetadata> meta = ParseRankMetadata(contents, meta_path, manifest, *entry);
    if (!meta.ok()) {
      const std::string& m = meta.status().message();
      file_problem(meta_path, m.compare(0, meta_path.size() + 2, meta_path + ": ") == 0
                                  ? m.substr(meta_path.size() + 2)
                                  : m);
      continue;
    }
    for (const proto::PersistedTensor& t : meta->tensors()) {
      tensor_names.insert(t.name());
      for (const proto::PersistedRun& r : t.runs()) total += r.bytes();
    }
    for (const proto::PersistedBlob& b : meta->blobs()) total += b.run().bytes();
    local_stats.blobs += meta->blobs_size();
    ranks.push_back({Join(dir, entry->data_file()), std::move(*meta)});
  }
  local_stats.tensors = static_cast<int64_t>(tensor_names.size());

  std::vector<uint8_t> buffer;
  for (const RankToCheck& rank : ranks) {
    const std::string& path = rank.data_path;
    if (!fs->Exists(path)) {
      file_problem(path, "missing file");
      continue;
    }
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> file, fs->NewReadableFile(path));
    const uint64_t size = file->size();
    bool truncated = false;
    auto check_run = [&](const proto::PersistedRun& run, const std::string& name, bool blob,
                         int32_t fragment) -> Status {
      auto problem = [&](uint64_t begin, uint64_t end, const char* what) {
        VerifyProblem p;
        p.file = path;
        p.tensor = name;
        p.blob = blob;
        p.fragment = fragment;
        p.begin = begin;
        p.end = end;
        p.what = what;
        problems.push_back(std::move(p));
      };
      const uint64_t chunks = ChunkCount(run.bytes(), run.chunk_bytes());
      for (uint64_t c = 0; c < chunks; ++c) {
        const auto [begin, end] = ChunkRange(run, c);
        MEMENTO_ASSIGN_OR_RETURN(const bool whole, ReadChunkBytes(file.get(), run, c, &buffer));
        if (!whole) {
          const uint64_t present = size > run.file_offset() ? size - run.file_offset() : 0;
          problem(std::max(begin, present), run.bytes(), "truncated");
          truncated = true;
          break;
        }
        if (!ChunkCrcMatches(run, c, buffer)) problem(begin, end, "CRC mismatch");
        local_stats.bytes += end - begin;
        if (progress) progress(local_stats.bytes, total);
      }
      return Status::Ok();
    };
    for (const proto::PersistedTensor& t : rank.meta.tensors()) {
      const bool several = t.runs_size() > 1;
      for (const proto::PersistedRun& run : t.runs()) {
        MEMENTO_RETURN_IF_ERROR(check_run(run, t.name(), false, several ? run.fragment() : -1));
      }
    }
    for (const proto::PersistedBlob& b : rank.meta.blobs()) {
      MEMENTO_RETURN_IF_ERROR(check_run(b.run(), b.name(), true, -1));
    }
    if (size < rank.meta.data_bytes() && !truncated) {
      file_problem(path, "truncated (" + Str(size) + " bytes, the manifest says " + Str(rank.meta.data_bytes()) + ")");
    } else if (size > rank.meta.data_bytes()) {
      file_problem(path, Str(size) + " bytes, the manifest says " + Str(rank.meta.data_bytes()));
    }
  }
  if (stats != nullptr) *stats = local_stats;
  return problems;
}

Status LoadRank(FileSystem* fs, const std::string& dir, const proto::Manifest& manifest,
                const proto::RankRecord& layout, uint8_t* slot) {
  const int32_t my_rank = layout.rank();
  const std::string rank_name = "rank " + std::to_string(my_rank);

  // Every rank's metadata (small), CRC-checked; tensors indexed by name.
  std::vector<proto::RankMetadata> metas;
  std::vector<std::string> data_paths;
  std::vector<int32_t> ranks;
  for (const proto::ManifestRank& r : manifest.ranks()) ranks.push_back(r.rank());
  std::sort(ranks.begin(), ranks.end());
  for (int32_t r : ranks) {
    MEMENTO_ASSIGN_OR_RETURN(proto::RankMetadata meta, ReadRankMetadata(fs, dir, manifest, r));
    data_paths.push_back(Join(dir, FindRank(manifest, r)->data_file()));
    metas.push_back(std::move(meta));
  }
  struct Held {
    size_t rank_index;
    const proto::PersistedTensor* tensor;
  };
  std::map<std::string, std::vector<Held>> by_name;
  for (size_t i = 0; i < metas.size(); ++i) {
    for (const proto::PersistedTensor& t : metas[i].tensors()) by_name[t.name()].push_back({i, &t});
  }

  // One open data file and one chunk at a time.
  size_t open_index = std::numeric_limits<size_t>::max();
  std::unique_ptr<ReadableFile> open_file;
  auto file_of = [&](size_t rank_index) -> Result<ReadableFile*> {
    if (open_index != rank_index) {
      open_file.reset();
      open_index = std::numeric_limits<size_t>::max();
      MEMENTO_ASSIGN_OR_RETURN(open_file, fs->NewReadableFile(data_paths[rank_index]));
      open_index = rank_index;
    }
    return open_file.get();
  };
  std::vector<uint8_t> chunk;
  struct ChunkKey {
    size_t rank_index = std::numeric_limits<size_t>::max();
    uint64_t file_offset = 0;
    uint64_t index = 0;
    bool operator==(const ChunkKey&) const = default;
  } cached;

  // Copies bytes [begin, end) of `run` (of rank `rank_index`) to `dst`, chunk by chunk, CRC-checked.
  auto copy_from_run = [&](size_t rank_index, const proto::PersistedRun& run, const std::string& name, bool blob,
                           int32_t fragment, uint64_t begin, uint64_t end, uint8_t* dst) -> Status {
    if (begin >= end) return Status::Ok();
    MEMENTO_ASSIGN_OR_RETURN(ReadableFile * file, file_of(rank_index));
    for (uint64_t c = begin / run.chunk_bytes(); c * run.chunk_bytes() < end; ++c) {
      const ChunkKey key{rank_index, run.file_offset(), c};
      if (!(cached == key)) {
        cached = ChunkKey{};
        MEMENTO_ASSIGN_OR_RETURN(const bool whole, ReadChunkBytes(file, run, c, &chunk));
        const auto [chunk_begin, chunk_end] = ChunkRange(run, c);
        if (!whole) {
          // As VerifyCheckpoint reports it: the bytes of the run past the file's end.
          const uint64_t present = file->size() > run.file_offset() ? file->size() - run.file_offset() : 0;
          return DataLoss(ProblemString(data_paths[rank_index], name, blob, fragment,
                                        std::max(chunk_begin, present), run.bytes(), "truncated"));
        }
        if (!ChunkCrcMatches(run, c, chunk)) {
          return DataLoss(ProblemString(data_paths[rank_index], name, blob, fragment, chunk_begin, chunk_end,
                                        "CRC mismatch"));
        }
        cached = key;
      }
      const uint64_t chunk_begin = c * run.chunk_bytes();
      const uint64_t from = std::max(begin, chunk_begin);
      const uint64_t to = std::min(end, chunk_begin + chunk.size());
      std::memcpy(dst + (from - begin), chunk.data() + (from - chunk_begin), static_cast<size_t>(to - from));
    }
    return Status::Ok();
  };

  for (const proto::TensorRecord& t : layout.tensors()) {
    const std::string tname = "tensor '" + t.name() + "'";
    auto found = by_name.find(t.name());
    if (found == by_name.end()) return NotFound(tname + " of " + rank_name + " is not in the checkpoint " + dir);
    MEMENTO_ASSIGN_OR_RETURN(DType dtype, DTypeFromInt(t.dtype()));
    Result<ShardSpec> target = FromProto(t.spec());
    if (!target.ok()) return target.status().WithContext(rank_name + " " + tname);
    MEMENTO_RETURN_IF_ERROR(target->Validate().WithContext(rank_name + " " + tname));
    const uint64_t width = DTypeSize(dtype);
    const uint64_t region = static_cast<uint64_t>(target->local_numel) * width;
    if (t.slot_offset() > layout.slot_bytes() || region > layout.slot_bytes() - t.slot_offset()) {
      return InvalidArgument(rank_name + " " + tname + ": slot bytes " + Str(t.slot_offset()) + ".." +
                             Str(t.slot_offset() + region) + " exceed the slot's " + Str(layout.slot_bytes()));
    }

    // One source per persisted run: its fragment, at local offset 0 of the run.
    struct Source {
      size_t rank_index;
      const proto::PersistedRun* run;
      int32_t fragment;  // for messages: -1 when the tensor has one run on that rank
    };
    std::vector<Source> sources;
    std::vector<ShardSpec> source_specs;
    for (const Held& h : found->second) {
      const proto::PersistedTensor& pt = *h.tensor;
      const std::string& path = data_paths[h.rank_index];
      if (pt.dtype() != t.dtype()) {
        return FailedPrecondition(tname + ": the checkpoint holds " + std::string(DTypeName(static_cast<DType>(pt.dtype()))) +
                                  " (" + path + "), " + rank_name + " registered " + std::string(DTypeName(dtype)));
      }
      MEMENTO_ASSIGN_OR_RETURN(ShardSpec saved, FromProto(pt.spec()));  // checked by ReadRankMetadata
      if (saved.global_shape != target->global_shape) {
        return FailedPrecondition(tname + ": the checkpoint's global shape " + ShapeString(saved.global_shape) + " (" +
                                  path + ") differs from " + rank_name + "'s " + ShapeString(target->global_shape));
      }
      for (const proto::PersistedRun& run : pt.runs()) {
        Fragment f = saved.fragments[static_cast<size_t>(run.fragment())];
        f.local_offset = 0;
        ShardSpec s;
        s.global_shape = saved.global_shape;
        s.original_shape = saved.original_shape;
        s.local_numel = f.numel();
        s.fragments.push_back(std::move(f));
        source_specs.push_back(std::move(s));
        sources.push_back({h.rank_index, &run, pt.runs_size() > 1 ? run.fragment() : -1});
      }
    }
    std::vector<const ShardSpec*> source_ptrs;
    for (const ShardSpec& s : source_specs) source_ptrs.push_back(&s);
    Result<ReshardPlan> plan = PlanReshard(*target, source_ptrs);
    if (!plan.ok()) return plan.status().WithContext(rank_name + " " + tname);
    if (!plan->complete()) {
      return FailedPrecondition(tname + ": the checkpoint covers " + std::to_string(plan->covered_elements) + " of " +
                                std::to_string(plan->target_elements) + " elements of " + rank_name + "'s shard");
    }
    // Source order: every chunk is read once.
    std::vector<CopyRun> copies = plan->runs;
    std::sort(copies.begin(), copies.end(), [](const CopyRun& a, const CopyRun& b) {
      return std::pair(a.source, a.source_offset) < std::pair(b.source, b.source_offset);
    });
    for (const CopyRun& c : copies) {
      const Source& s = sources[static_cast<size_t>(c.source)];
      const uint64_t begin = static_cast<uint64_t>(c.source_offset) * width;
      const uint64_t end = begin + static_cast<uint64_t>(c.elements) * width;
      uint8_t* dst = slot + t.slot_offset() + static_cast<uint64_t>(c.target_offset) * width;
      MEMENTO_RETURN_IF_ERROR(copy_from_run(s.rank_index, *s.run, t.name(), false, s.fragment, begin, end, dst));
    }
  }

  if (layout.blobs_size() == 0) return Status::Ok();
  size_t own = metas.size();
  for (size_t i = 0; i < metas.size(); ++i) {
    if (metas[i].rank() == my_rank) own = i;
  }
  for (const proto::BlobRecord& b : layout.blobs()) {
    const std::string bname = "blob '" + b.name() + "'";
    if (own == metas.size()) {
      return NotFound(bname + " of " + rank_name + ": the checkpoint " + dir + " has no " + rank_name + " (world size " +
                      std::to_string(manifest.world_size()) + ")");
    }
    const proto::PersistedBlob* saved = nullptr;
    for (const proto::PersistedBlob& pb : metas[own].blobs()) {
      if (pb.name() == b.name()) saved = &pb;
    }
    if (saved == nullptr) return NotFound(bname + " of " + rank_name + " is not in the checkpoint " + dir);
    if (b.slot_offset() > layout.slot_bytes() || layout.slot_bytes() - b.slot_offset() < 8 ||
        b.capacity() > layout.slot_bytes() - b.slot_offset() - 8) {
      return InvalidArgument(rank_name + " " + bname + ": slot bytes " + Str(b.slot_offset()) + ".." +
                             Str(b.slot_offset() + 8 + b.capacity()) + " exceed the slot's " + Str(layout.slot_bytes()));
    }
    const uint64_t length = saved->run().bytes();
    if (length > b.capacity()) {
      return FailedPrecondition(bname + ": the checkpoint holds " + Str(length) + " bytes, " + rank_name +
                                " registered a capacity of " + Str(b.capacity()));
    }
    uint8_t* dst = slot + b.slot_offset();
    MEMENTO_RETURN_IF_ERROR(copy_from_run(own, saved->run(), b.name(), true, -1, 0, length, dst + 8));
    StoreU64(length, dst);
    std::memset(dst + 8 + length, 0, static_cast<size_t>(b.capacity() - length));
  }
  return Status::Ok();
}

}  // namespace memento
