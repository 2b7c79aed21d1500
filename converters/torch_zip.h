// PyTorch's zip file format (torch.save since 1.6; docs/formats/ecosystem.md): a zip archive with
// one top-level folder holding data.pkl (the pickled object), data/<key> (raw little-endian storage
// bytes), version and byteorder. ZipArchive reads zip archives (stored entries, and deflated ones
// when built with zlib) with hostile input in mind: entry names with "..", absolute names or
// backslashes, data outside the file, sizes past the limits, inflated sizes past the declared
// ones (zip bombs) and CRC mismatches are refused. ZipBuilder writes stored entries (zip64 when
// needed), data aligned to 64 bytes as torch does. TorchFile and TorchFileBuilder read and write
// whole torch files on top. All I/O goes through a FileSystem. Thread-compatible.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "converters/torch_pickle.h"
#include "core/file_system.h"
#include "core/status.h"

namespace memento {

struct ZipEntry {
  std::string name;
  uint16_t method = 0;           // 0 stored, 8 deflated
  uint32_t crc32 = 0;
  uint64_t compressed_size = 0;
  uint64_t size = 0;             // uncompressed
  uint64_t data_offset = 0;      // of the (compressed) bytes in the file
};

struct ZipLimits {
  // Entries in one archive. Default 1M.
  uint64_t max_entries = uint64_t{1} << 20;
  // Uncompressed bytes of a deflated entry (a stored entry is bounded by the file). Default 1 GiB.
  uint64_t max_inflated_bytes = uint64_t{1} << 30;
  // Uncompressed / compressed size of a deflated entry above which it is refused as a zip bomb.
  // Default 1000.
  uint64_t max_ratio = 1000;
};

// CRC-32 (the zip/zlib polynomial) of `n` bytes, continuing from `crc`.
uint32_t ZipCrc32(const void* data, size_t n, uint32_t crc = 0);

class ZipArchive {
 public:
  // Reads the central directory. InvalidArgument for a file that is not a zip (or is a legacy
  // torch file), DataLoss for a malformed or truncated one, both naming `path`.
  static Result<std::unique_ptr<ZipArchive>> Open(FileSystem* fs, const std::string& path, const ZipLimits& limits = {});

  const std::string& path() const { return path_; }
  const std::vector<ZipEntry>& entries() const { return entries_; }
  // nullptr when absent.
  const ZipEntry* Find(const std::string& name) const;
  // All bytes of an entry, CRC-checked (DataLoss on mismatch); deflated entries are inflated
  // within the limits.
  Result<std::string> Read(const ZipEntry& entry);
  // `n` bytes at `offset` of a stored entry's data (not CRC-checked: for reading parts).
  Status ReadStored(const ZipEntry& entry, uint64_t offset, void* dst, size_t n);

 private:
  std::string path_;
  ZipLimits limits_;
  std::unique_ptr<ReadableFile> file_;
  std::vector<ZipEntry> entries_;
  std::map<std::string, size_t> index_;
};

// Writes a zip of stored entries, in the order added, to a new file. Not thread-safe.
class ZipBuilder {
 public:
  static Result<std::unique_ptr<ZipBuilder>> Create(FileSystem* fs, const std::string& path,
                                                    const WriteOptions& options = {.direct_io = false});
  // InvalidArgument for a name that is empty, absolute, has a ".." component or repeats.
  Status Add(const std::string& name, const void* data, size_t n);
  // Central directory and end records; syncs and closes the file.
  Status Finish();

 private:
  struct Written {
    std::string name;
    uint32_t crc32;
    uint64_t size;
    uint64_t header_offset;
  };
  std::string path_;
  std::unique_ptr<WritableFile> file_;
  std::vector<Written> written_;
  std::map<std::string, bool> names_;
};

// A torch.save file: the unpickled object and access to its storages.
class TorchFile {
 public:
  // Open checks the archive (one data.pkl under one top-level folder) and runs the pickle machine.
  // InvalidArgument naming `path` for a legacy (pre-1.6, non-zip) file, a hostile pickle or zip.
  static Result<std::unique_ptr<TorchFile>> Open(FileSystem* fs, const std::string& path,
                                                 const PickleLimits& pickle_limits = {}, const ZipLimits& zip_limits = {});

  const PickleValue& root() const { return *root_; }
  const std::string& path() const { return archive_->path(); }
  const std::string& prefix() const { return prefix_; }  // the top-level folder, e.g. "archive"
  // The tensor's elements, row-major contiguous (strided views are gathered). DataLoss naming the
  // file and storage when the storage entry is missing or has the wrong size.
  Result<std::vector<uint8_t>> ReadTensor(const TorchTensorRef& tensor);
  // As ReadTensor, into `dst` (numel x width bytes); a contiguous view of a stored entry is read
  // straight into it.
  Status ReadTensorInto(const TorchTensorRef& tensor, uint8_t* dst);

 private:
  std::unique_ptr<ZipArchive> archive_;
  std::string prefix_;
  PickleValuePtr root_;
};

// Builds a torch file: tensors added get storages data/0, data/1, ...; Write pickles `root`.
class TorchFileBuilder {
 public:
  // A tensor value (contiguous, its own storage) holding `bytes` (numel x width of dtype, row-major).
  Result<PickleValuePtr> AddTensor(DType dtype, const std::vector<int64_t>& shape, std::vector<uint8_t> bytes);
  // Writes `path`: <archive>/data.pkl, byteorder, data/<key>..., version; then syncs it.
  // `archive` is the top-level folder name (torch uses the file's stem).
  Status Write(FileSystem* fs, const std::string& path, const PickleValue& root, const std::string& archive = "archive");

 private:
  std::vector<std::vector<uint8_t>> storages_;
};

}  // namespace memento
