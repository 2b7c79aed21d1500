// An in-memory FileSystem for the fuzz targets: the readers that take a directory or a path run on
// the fuzzer's bytes without touching the disk. Paths resolve as on POSIX without links (empty and
// "." components dropped, ".." goes up, relative paths start at "/"), so a name that escapes its
// directory reaches whatever the target put there. Not durable by design: Sync and SyncDir do
// nothing. Thread-safe (the converters write from several threads).
#pragma once

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "core/file_system.h"

namespace memento::fuzz {

class MemoryFileSystem : public FileSystem {
 public:
  MemoryFileSystem() { dirs_.insert("/"); }

  // Creates or replaces `path` with `bytes`, creating its parent directories.
  void Put(const std::string& path, std::string bytes) {
    const std::string p = Normal(path);
    std::lock_guard<std::mutex> lock(mu_);
    AddDirsLocked(Parent(p));
    files_[p] = std::make_shared<std::string>(std::move(bytes));
  }
  // The bytes of `path`, or nullptr when it is not a file.
  std::shared_ptr<const std::string> Get(const std::string& path) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = files_.find(Normal(path));
    return it == files_.end() ? nullptr : it->second;
  }
  // Removes everything.
  void Clear() {
    std::lock_guard<std::mutex> lock(mu_);
    files_.clear();
    dirs_ = {"/"};
  }

  Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path, const WriteOptions& = {}) override {
    const std::string p = Normal(path);
    std::lock_guard<std::mutex> lock(mu_);
    if (dirs_.count(Parent(p)) == 0) return NotFound(path + ": no such directory");
    if (dirs_.count(p) != 0) return FailedPrecondition(path + ": is a directory");
    auto bytes = std::make_shared<std::string>();
    files_[p] = bytes;
    return std::unique_ptr<WritableFile>(new Writable(this, std::move(bytes)));
  }
  Result<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& path) override {
    std::shared_ptr<const std::string> bytes = Get(path);
    if (bytes == nullptr) return NotFound(path + ": no such file");
    return std::unique_ptr<ReadableFile>(new Readable(path, std::move(bytes)));
  }
  Status CreateDirs(const std::string& path) override {
    const std::string p = Normal(path);
    std::lock_guard<std::mutex> lock(mu_);
    for (std::string d = p; d != "/"; d = Parent(d)) {
      if (files_.count(d) != 0) return FailedPrecondition(path + ": " + d + " is a file");
    }
    AddDirsLocked(p);
    return Status::Ok();
  }
  Status SyncDir(const std::string&) override { return Status::Ok(); }
  Status Rename(const std::string& from, const std::string& to) override {
    const std::string f = Normal(from), t = Normal(to);
    std::lock_guard<std::mutex> lock(mu_);
    if (dirs_.count(Parent(t)) == 0) return NotFound(to + ": no such directory");
    if (auto it = files_.find(f); it != files_.end()) {
      auto bytes = it->second;
      files_.erase(it);
      files_[t] = std::move(bytes);
      return Status::Ok();
    }
    if (dirs_.count(f) == 0 || f == "/") return NotFound(from + ": no such file or directory");
    RemoveAllLocked(t);
    std::map<std::string, std::shared_ptr<std::string>> files;
    std::set<std::string> dirs;
    for (auto& [p, b] : files_) files[Within(p, f) ? t + p.substr(f.size()) : p] = b;
    for (const std::string& d : dirs_) dirs.insert(Within(d, f) ? t + d.substr(f.size()) : d);
    files_ = std::move(files);
    dirs_ = std::move(dirs);
    return Status::Ok();
  }
  Status RemoveFile(const std::string& path) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (files_.erase(Normal(path)) == 0) return NotFound(path + ": no such file");
    return Status::Ok();
  }
  Status RemoveAll(const std::string& path) override {
    std::lock_guard<std::mutex> lock(mu_);
    RemoveAllLocked(Normal(path));
    return Status::Ok();
  }
  Result<std::vector<std::string>> ListDir(const std::string& path) override {
    const std::string p = Normal(path);
    std::lock_guard<std::mutex> lock(mu_);
    if (dirs_.count(p) == 0) return NotFound(path + ": no such directory");
    std::set<std::string> names;
    for (const auto& [f, b] : files_) {
      if (Parent(f) == p) names.insert(f.substr(f.rfind('/') + 1));
    }
    for (const std::string& d : dirs_) {
      if (d != "/" && Parent(d) == p) names.insert(d.substr(d.rfind('/') + 1));
    }
    return std::vector<std::string>(names.begin(), names.end());
  }
  bool Exists(const std::string& path) override {
    const std::string p = Normal(path);
    std::lock_guard<std::mutex> lock(mu_);
    return files_.count(p) != 0 || dirs_.count(p) != 0;
  }
  Result<uint64_t> FileSize(const std::string& path) override {
    std::shared_ptr<const std::string> bytes = Get(path);
    if (bytes == nullptr) return NotFound(path + ": no such file");
    return static_cast<uint64_t>(bytes->size());
  }

 private:
  class Writable : public WritableFile {
   public:
    Writable(MemoryFileSystem* fs, std::shared_ptr<std::string> bytes) : fs_(fs), bytes_(std::move(bytes)) {}
    Status Append(const void* data, size_t n) override {
      std::lock_guard<std::mutex> lock(fs_->mu_);
      bytes_->append(static_cast<const char*>(data), n);
      return Status::Ok();
    }
    Status Sync() override { return Status::Ok(); }
    Status Close() override { return Status::Ok(); }
    uint64_t size() const override {
      std::lock_guard<std::mutex> lock(fs_->mu_);
      return bytes_->size();
    }

   private:
    MemoryFileSystem* fs_;
    std::shared_ptr<std::string> bytes_;
  };

  // Reads the bytes the file held when it was opened.
  class Readable : public ReadableFile {
   public:
    Readable(std::string path, std::shared_ptr<const std::string> bytes)
        : path_(std::move(path)), bytes_(std::move(bytes)), size_(bytes_->size()) {}
    Status ReadAt(uint64_t offset, void* dst, size_t n) override {
      if (offset > size_ || n > size_ - offset) {
        return DataLoss(path_ + ": read of " + std::to_string(n) + " bytes at " + std::to_string(offset) +
                        " past the end (" + std::to_string(size_) + " bytes)");
      }
      std::copy_n(bytes_->data() + offset, n, static_cast<char*>(dst));
      return Status::Ok();
    }
    uint64_t size() const override { return size_; }

   private:
    std::string path_;
    std::shared_ptr<const std::string> bytes_;
    uint64_t size_;
  };

  // The absolute path without empty, "." and ".." components, as a POSIX file system resolves it.
  static std::string Normal(const std::string& path) {
    std::vector<std::string> parts;
    for (size_t begin = 0; begin <= path.size();) {
      size_t end = path.find('/', begin);
      if (end == std::string::npos) end = path.size();
      const std::string part = path.substr(begin, end - begin);
      if (part == "..") {
        if (!parts.empty()) parts.pop_back();
      } else if (!part.empty() && part != ".") {
        parts.push_back(part);
      }
      begin = end + 1;
    }
    std::string out;
    for (const std::string& part : parts) out += "/" + part;
    return out.empty() ? "/" : out;
  }
  static std::string Parent(const std::string& p) {
    const size_t slash = p.rfind('/');
    return slash == 0 ? "/" : p.substr(0, slash);
  }
  // Whether `p` is `dir` or lies under it.
  static bool Within(const std::string& p, const std::string& dir) {
    return p == dir || (p.size() > dir.size() && p.compare(0, dir.size(), dir) == 0 && p[dir.size()] == '/');
  }
  void AddDirsLocked(const std::string& dir) {
    for (std::string d = dir; dirs_.insert(d).second && d != "/"; d = Parent(d)) {
    }
  }
  void RemoveAllLocked(const std::string& p) {
    std::erase_if(files_, [&](const auto& f) { return Within(f.first, p); });
    std::erase_if(dirs_, [&](const std::string& d) { return d != "/" && Within(d, p); });
  }

  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<std::string>> files_;  // GUARDED_BY(mu_)
  std::set<std::string> dirs_;                                 // GUARDED_BY(mu_)
};

}  // namespace memento::fuzz
