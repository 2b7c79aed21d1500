// Private to converters/: how importers hand consolidated tensors to the universal format.
// NativeStaging: a temporary native checkpoint (docs/formats/native-checkpoint.md) that
// importers fill with whole tensors, packed into "ranks" of about 64 MiB, and then hand to the
// universal writer (ConvertNativeToUniversal), which CRCs, consolidates and commits them. Each
// tensor is one whole-tensor box on one rank; blobs go to the last rank. Not thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/file_system.h"
#include "core/status.h"
#include "proto/checkpoint.pb.h"
#include "proto/universal.pb.h"
#include "ucp_format/universal.h"

namespace memento {

// A FileSystem for temporary files that are read back soon and never need to survive a crash:
// writes go to the page cache (plain write(2), no fsync; Sync and SyncDir do nothing); everything
// else is `base`'s. For the staging checkpoint only.
std::unique_ptr<FileSystem> UnsyncedFileSystem(FileSystem* base);

class NativeStaging {
 public:
  // `dir` is created; `step` and job id "import" go into its manifest.
  // Writes go through UnsyncedFileSystem(fs): the staging files are temporary.
  NativeStaging(FileSystem* fs, std::string dir, int64_t step)
      : unsynced_(UnsyncedFileSystem(fs)), fs_(unsynced_.get()), dir_(std::move(dir)), step_(step) {}

  // Bytes must be numel(shape) x width(dtype), row-major. A shape of {} is stored as {1}.
  Status AddTensor(const std::string& name, DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes);
  // Blobs are written with the last rank, by Finish.
  void AddBlob(const std::string& name, std::string bytes) { blobs_.emplace_back(name, std::move(bytes)); }
  // Writes what is pending and commits the manifest.
  Status Finish();

 private:
  struct Pending {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  // Writes the pending tensors as the next rank; the last one also takes the blobs.
  Status Flush(bool last);

  std::unique_ptr<FileSystem> unsynced_;
  FileSystem* fs_;
  std::string dir_;
  int64_t step_;
  std::vector<std::pair<std::string, std::string>> blobs_;
  std::vector<Pending> pending_;
  uint64_t pending_bytes_ = 0;
  std::vector<proto::ManifestRank> ranks_;
  std::vector<uint8_t> slot_;  // reused by every rank
};

// Writes a universal checkpoint (docs/formats/universal-checkpoint.md) straight from consolidated
// tensors: params/<param>.safetensors per parameter (states in the order given), blobs.safetensors,
// manifest.json and manifest.pb, in a temporary directory renamed to `out_dir` by Commit. Used by
// importers that consolidate in memory (no native staging pass). A parameter is streamed:
// BeginParam (its states' dtypes and shapes: the file's header), AppendState (the states' bytes,
// in order, in pieces of any size: a caller need not hold a whole parameter), EndParam. Destroying
// an uncommitted sink removes its temporary directory. Not thread-safe.
class UniversalSink {
 public:
  struct StateInfo {
    std::string state;        // "fp32", "exp_avg", ...
    std::string source_name;  // the tensor's name in the source
    DType dtype = DType::kInvalid;
    std::vector<int64_t> shape;
  };
  // `kind` and `path` describe the source (manifest.source); `write` the data files' options.
  UniversalSink(FileSystem* fs, std::string out_dir, std::string kind, std::string path, int64_t step, WriteOptions write);
  ~UniversalSink();

  // AlreadyExists when `out_dir` exists; creates the temporary directory.
  Status Begin();
  // Opens the parameter's file and writes its header. One parameter at a time; InvalidArgument
  // for a repeated parameter name.
  Status BeginParam(const std::string& name, std::vector<StateInfo> states, const std::string& source_layout);
  // The next `n` bytes of the open parameter's states (row-major, states in BeginParam's order),
  // CRC'd as they pass. Internal when they go past the last state.
  Status AppendState(const void* data, size_t n);
  // Closes the parameter's file. Internal when its states did not get all their bytes.
  Status EndParam();
  void AddBlob(const std::string& name, std::string bytes) { blobs_.emplace_back(name, std::move(bytes)); }
  // Blobs, manifest, syncs, rename: the commit point.
  Result<ConvertSummary> Commit();

 private:
  // Finishes the states of the open parameter that are complete (or empty) from `state_` on.
  void FinishCompleteStates();

  FileSystem* fs_;
  std::string out_dir_, tmp_, kind_, path_;
  int64_t step_;
  WriteOptions write_;
  bool committed_ = false;
  std::vector<proto::UniversalParam> params_;
  std::vector<std::pair<std::string, std::string>> blobs_;
  ConvertSummary summary_;
  std::chrono::steady_clock::time_point started_;
  // The open parameter: its file, manifest entry, states' sizes, and the state being written.
  std::unique_ptr<WritableFile> file_;
  proto::UniversalParam open_;
  std::vector<uint64_t> state_bytes_;
  size_t state_ = 0;
  uint64_t state_done_ = 0;  // bytes of state_ written
  uint64_t crc_ = 0, chunk_crc_ = 0;
};

}  // namespace memento
