// The universal checkpoint (DESIGN §6, docs/formats/universal-checkpoint.md): one consolidated
// entry per parameter (its value and every optimizer state, at the full logical shape) in
// safetensors files, plus a manifest (proto/universal.proto, with a JSON view):
//   <out>/params/<param>.safetensors   one file per parameter; keys = states ("fp32", "exp_avg", ...)
//   <out>/blobs.safetensors            per-rank blobs, keys "rank-<r>/<name>" (U8 vectors)
//   <out>/manifest.json                the manifest in Protobuf's JSON mapping
//   <out>/manifest.pb                  UniversalManifest, written last
// The directory is built under a temporary name next to <out> and renamed into place: a
// directory without manifest.pb is not a universal checkpoint.
// Also: loading any saved state (universal or native) onto a new layout (box intersection; vocab
// re-padded; ZeRO partitions are whatever the new ShardSpecs say). All I/O goes through a
// FileSystem. Free functions; each call is self-contained and may run on any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/file_system.h"
#include "core/status.h"
#include "proto/memento.pb.h"
#include "proto/universal.pb.h"
#include "ucp_format/pattern_spec.h"

namespace memento {

inline constexpr uint32_t kUniversalFormatVersion = 1;
inline constexpr const char* kUniversalManifestName = "manifest.pb";
inline constexpr const char* kUniversalManifestJsonName = "manifest.json";

struct ConvertOptions {
  // Parameters consolidated at once, one per thread (at least 1). Default 4.
  int threads = 4;
  // Rows of a tensor are consolidated in slabs of about this many bytes (at least one row); each
  // thread holds about two slabs and its output file's write buffers. Default 16 MiB.
  uint64_t slab_bytes = uint64_t{16} << 20;
  // Unit of the per-chunk CRCs recorded next to each tensor's CRC. Default 64 MiB.
  uint64_t crc_chunk_bytes = uint64_t{64} << 20;
  // Rules for layouts whose metadata is partial, and the state naming. Null (default): native
  // metadata only, states named as memento-train-example names them (<param>.exp_avg, ...).
  const PatternSpec* pattern = nullptr;
  // Called with the tensor bytes written so far and the total, serialized across threads (from
  // whichever thread wrote). Default: none.
  std::function<void(uint64_t done, uint64_t total)> progress;
  // Options of the output files. Default: O_DIRECT where possible, 4 MiB buffers, 2 queued writes
  // (each thread's output file holds at most about 12 MiB; peak memory stays within 2 x the
  // largest tensor + 256 MiB at 4 threads).
  WriteOptions write = {.direct_io = true, .buffer_bytes = size_t{4} << 20, .mode = 0600, .max_queued_writes = 2};
};

struct ConvertSummary {
  std::string out_dir;
  int64_t step = -1;
  int32_t source_world_size = 0;
  int64_t params = 0;
  int64_t tensors = 0;              // states over all parameters
  int64_t blobs = 0;
  uint64_t tensor_bytes = 0;        // consolidated tensor bytes written
  uint64_t bytes_read = 0;          // bytes read from the source's data files
  uint64_t largest_tensor_bytes = 0;
  double seconds = 0;
};

// Consolidates the committed native checkpoint `native_dir` (<root>/<job>/step-<N>) into a new
// universal checkpoint at `out_dir`, which must not exist. Every byte read is CRC-checked against
// the native metadata: DataLoss names the file, tensor and byte range ("truncated", "CRC mismatch").
// FailedPrecondition when saved pieces do not cover a tensor or ranks disagree on a tensor's shape
// and no rule explains it; InvalidArgument for a pattern rule that cannot apply or (strict) a rule
// that applies to no parameter; AlreadyExists when `out_dir` exists. On error nothing is left at
// `out_dir` (the temporary directory is removed).
Result<ConvertSummary> ConvertNativeToUniversal(FileSystem* fs, const std::string& native_dir,
                                                const std::string& out_dir, const ConvertOptions& options = {});

// NotFound when `dir` has no manifest.pb (not a universal checkpoint); DataLoss when malformed.
Result<proto::UniversalManifest> ReadUniversalManifest(FileSystem* fs, const std::string& dir);

// The bytes of manifest.pb. Protobuf's string fields hold UTF-8 only, and a manifest holding other
// bytes does not parse back: a name that is not UTF-8 (a key of a foreign torch or safetensors
// file) is refused, InvalidArgument naming it.
Result<std::string> SerializeUniversalManifest(const proto::UniversalManifest& manifest);

// All bytes of one state of one parameter, checked against the manifest's CRC. NotFound when absent.
Result<std::vector<uint8_t>> ReadUniversalTensor(FileSystem* fs, const std::string& dir,
                                                 const proto::UniversalManifest& manifest, const std::string& param,
                                                 const std::string& state);

// Re-reads every tensor and blob and checks each against its CRC and the safetensors headers.
// Returns one line per problem ("<file>: tensor '<key>': CRC mismatch"); empty when intact.
Result<std::vector<std::string>> VerifyUniversal(FileSystem* fs, const std::string& dir);

// Fills `slot` (laid out as `layout`, the registered layout of rank layout.rank()) from the saved
// state in `dir`: a universal checkpoint (manifest.pb) or a committed native one (manifest), with
// any layout. Each registered fragment is filled by box intersection from the saved pieces that
// overlap it; vocab padding is cut and re-padded with zeros (the logical shapes must agree);
// registered flat (ZeRO) fragments are filled the same way. Tensors are found by their names in
// the source checkpoint. Blobs follow the rank-number rule: rank r's blob comes from saved rank
// r; NotFound says so when the saved job had no rank r or r saved no such blob. Every byte read is
// CRC-checked (DataLoss names file, tensor, bytes).
Status LoadRankResharded(FileSystem* fs, const std::string& dir, const proto::RankRecord& layout, uint8_t* slot);

}  // namespace memento
