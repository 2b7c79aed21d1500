// The native persisted checkpoint: the layout the flusher writes and restores read.
//   <root>/<job>/step-<N>/rank-<r>.data   replica-0 fragments and blobs of rank r, 4 KiB aligned
//   <root>/<job>/step-<N>/rank-<r>.meta   RankMetadata (proto/checkpoint.proto), with CRCs
//   <root>/<job>/step-<N>/manifest        Manifest, written last (temporary name, fsync, rename)
// A directory without a manifest is not a checkpoint. All I/O goes through a FileSystem.
// Thread-compatible free functions; distinct ranks may be written from distinct threads.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/file_system.h"
#include "core/status.h"
#include "proto/checkpoint.pb.h"
#include "proto/memento.pb.h"

namespace memento {

inline constexpr uint32_t kNativeFormatVersion = 1;

// <root>/<job>
std::string JobDir(const std::string& root, const std::string& job);
// <root>/<job>/step-<N>
std::string CheckpointDir(const std::string& root, const std::string& job, int64_t step);
// rank-<r>.data and rank-<r>.meta: names inside a checkpoint directory.
std::string DataFileName(int32_t rank);
std::string MetaFileName(int32_t rank);

// One rank's bytes of one version, as its agent holds them: the slot and its layout.
struct RankImage {
  int32_t rank = 0;
  int32_t world_size = 0;
  const proto::RankRecord* layout = nullptr;  // tensors and blobs with their slot offsets
  const uint8_t* slot = nullptr;              // layout->slot_bytes() bytes
  // Optional: the CRCs the agent took of the slot's regions when the version was captured
  // (agent/node_state.cc RegionLayout). A run that is a whole tensor region, with the same chunk
  // size, takes its chunk CRCs from there instead of reading the bytes once more; the file then
  // carries the CRCs of what was captured, so bytes that changed in memory since fail on reading.
  const std::vector<proto::RegionCrc>* region_crcs = nullptr;
};

struct PersistOptions {
  WriteOptions write;
  // Cap on this call's write rate, bytes per second; 0 = unlimited (default).
  double bandwidth_bytes_per_s = 0;
  // Bytes handed to the file at a time (default 16 MiB). Smaller pieces let `yield` stop the write
  // stream sooner, at some cost in throughput.
  uint64_t piece_bytes = uint64_t{16} << 20;
  // Called before each piece is written: the agent uses it to let captures of the
  // training ranks go first (memory bandwidth and cores). Default: none.
  std::function<void()> yield;
  // CRC unit of persisted runs (default 64 MiB).
  uint64_t crc_chunk_bytes = uint64_t{64} << 20;
};

// Writes rank-<r>.data and rank-<r>.meta into `dir` (created when missing), synced. Only
// fragments with replica id 0 are written. Returns the manifest's entry for the rank.
Result<proto::ManifestRank> WriteRankFiles(FileSystem* fs, const std::string& dir, const std::string& job_id,
                                           int64_t step, const RankImage& image, const PersistOptions& options);

// The manifest of a checkpoint whose ranks were written by WriteRankFiles: format and library
// version, created_unix_ms = now, ranks sorted by rank, total_bytes = the sum of their data_bytes.
proto::Manifest BuildManifest(const std::string& job_id, int64_t step, int32_t world_size,
                              std::vector<proto::ManifestRank> ranks);

// The commit point: writes `dir`/manifest atomically.
Status CommitManifest(FileSystem* fs, const std::string& dir, const proto::Manifest& manifest);

// NotFound when `dir` has no manifest (not a checkpoint); DataLoss/InvalidArgument when malformed.
Result<proto::Manifest> ReadManifest(FileSystem* fs, const std::string& dir);
// Reads and checks (against the manifest's meta_crc) the metadata of `rank`.
Result<proto::RankMetadata> ReadRankMetadata(FileSystem* fs, const std::string& dir, const proto::Manifest& manifest,
                                             int32_t rank);

struct CheckpointInfo {
  int64_t step = -1;
  std::string dir;
  bool committed = false;     // has a valid manifest
  uint64_t bytes = 0;         // data bytes (from the manifest, or on disk when uncommitted)
  int32_t ranks = 0;
  // Why the directory is not a checkpoint (ReadManifest's message); empty when committed.
  std::string uncommitted_reason;
};
// The step-<N> directories under <root>/<job>, oldest first. NotFound when the job dir is missing.
Result<std::vector<CheckpointInfo>> ListCheckpoints(FileSystem* fs, const std::string& job_dir);

struct VerifyProblem {
  std::string file;           // path
  std::string tensor;         // tensor or blob name; empty for file-level problems
  uint64_t begin = 0;         // byte range in the tensor's persisted bytes
  uint64_t end = 0;
  std::string what;           // "CRC mismatch", "missing file", "truncated", ...
  // The fragment index (in the rank's spec) when the tensor has several persisted runs on the
  // rank, -1 otherwise; begin/end are then relative to that fragment's run.
  int32_t fragment = -1;
  bool blob = false;          // `tensor` names a blob
  // "<file>: tensor '<t>' bytes <b>..<e>: <what>", "<file>: blob '<b>' bytes ...", "<file>: <what>".
  std::string ToString() const;
};
// Re-reads every byte of the checkpoint and checks every CRC. An empty vector means intact.
// Errors: NotFound/DataLoss/FailedPrecondition from ReadManifest, IOError when a read fails.
Result<std::vector<VerifyProblem>> VerifyCheckpoint(FileSystem* fs, const std::string& dir);

// What a verification covered.
struct VerifyStats {
  int64_t tensors = 0;        // distinct tensor names across ranks
  int64_t blobs = 0;          // blobs across ranks
  uint64_t bytes = 0;         // bytes read and CRC-checked (runs only, not padding)
};
// Called after each chunk with the bytes checked so far and the total to check.
using VerifyProgress = std::function<void(uint64_t bytes_done, uint64_t bytes_total)>;
// As above; fills `stats` (may be null) and reports progress (may be empty).
Result<std::vector<VerifyProblem>> VerifyCheckpoint(FileSystem* fs, const std::string& dir, VerifyStats* stats,
                                                    const VerifyProgress& progress = {});

// Fills `slot` (laid out as `layout`, the registered layout of rank layout.rank()) from the
// checkpoint: each fragment from the persisted replica-0 fragments of any rank that overlap it
// (box intersection, core/reshard.h), each blob from the rank's own file. Every byte read is
// CRC-checked; a mismatch is DataLoss naming the file, tensor and byte range. NotFound when a
// registered tensor or blob is absent; FailedPrecondition when the saved data cannot cover it.
Status LoadRank(FileSystem* fs, const std::string& dir, const proto::Manifest& manifest,
                const proto::RankRecord& layout, uint8_t* slot);

}  // namespace memento
