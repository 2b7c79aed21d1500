// safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian header
// length N, N bytes of JSON header {"<key>": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
// "__metadata__": {"<str>": "<str>"}}, then the tensors' bytes, row-major little-endian, covering
// the data buffer exactly. Writing streams (the header first, from the declared tensors); reading
// checks the header the way the reference implementation does. Thread-compatible.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/file_system.h"
#include "core/status.h"

namespace memento {

struct SafetensorsEntry {
  std::string key;
  DType dtype = DType::kInvalid;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // data_offsets, relative to the data buffer
  uint64_t end = 0;
};

// A header built from the tensors to write, in order; the data buffer starts at data_start(),
// which is padded (spaces in the header) to a multiple of 4 KiB.
class SafetensorsHeader {
 public:
  // InvalidArgument for an empty or duplicate key, a key "__metadata__", or an invalid dtype.
  Status Add(const std::string& key, DType dtype, const std::vector<int64_t>& shape);
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  // The 8-byte length followed by the JSON, padded.
  std::string Serialize() const;
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  // Bytes before the data buffer (8 + padded JSON length).
  uint64_t data_start() const { return Serialize().size(); }
  uint64_t data_bytes() const { return data_bytes_; }

 private:
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
  uint64_t data_bytes_ = 0;
};

// A parsed safetensors file. Open() reads and checks the header: JSON syntax, known dtypes,
// offsets that tile the data buffer exactly, sizes equal to elements x width, and the file's size.
class SafetensorsFile {
 public:
  static Result<std::unique_ptr<SafetensorsFile>> Open(FileSystem* fs, const std::string& path);

  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Bytes from the file's start to the data buffer.
  uint64_t data_start() const { return data_start_; }
  // NotFound naming the file when absent.
  Result<const SafetensorsEntry*> Find(const std::string& key) const;
  // Reads all bytes of `key`.
  Result<std::vector<uint8_t>> Read(const std::string& key);
  ReadableFile* file() { return file_.get(); }

 private:
  std::string path_;
  std::unique_ptr<ReadableFile> file_;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
  uint64_t data_start_ = 0;
};

}  // namespace memento
