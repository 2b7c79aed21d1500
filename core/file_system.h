// All storage I/O goes through FileSystem (STYLE.md 4, RocksDB's file_system.h): a POSIX
// implementation for production (large aligned writes, O_DIRECT where the file system allows it,
// fsync of files and directories, temporary names then rename) and a fault-injecting wrapper for
// tests (ENOSPC, EIO, short writes, a crash that drops unsynced data).
// Thread safety: a FileSystem may be used from many threads; one file object from one thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace memento {

struct WriteOptions {
  // Bypass the page cache with O_DIRECT where the file system supports it (falls back silently
  // where it does not, e.g. tmpfs). Default true.
  bool direct_io = true;
  // Bytes buffered (aligned to 4 KiB) before each write(2). Default 16 MiB. The POSIX file keeps
  // up to two such buffers: one being filled while the other is written in the background.
  size_t buffer_bytes = size_t{16} << 20;
  // Mode of a new file. Default 0600.
  uint32_t mode = 0600;
  // Writes the POSIX file may have queued for its I/O thread at once (at least 1). Default 4;
  // background writers that must get out of the way quickly (the flusher) use 1.
  size_t max_queued_writes = 4;
};

// Write-behind: Append may return before its bytes reach the file (the POSIX file writes full
// buffers on an internal I/O thread), so a failed write is reported by the next Append, Sync or
// Close of the file, with the same message a synchronous write would give. After such an error
// nothing taken is lost: the next call that writes retries the failed write first.
class WritableFile {
 public:
  // Abandons the bytes not yet written out (as a crash would) and waits for a write in progress.
  virtual ~WritableFile() = default;
  // Appends `n` bytes. The memory at `data` is not used after Append returns. Errors name the
  // path; ENOSPC maps to ResourceExhausted (retryable).
  virtual Status Append(const void* data, size_t n) = 0;
  // Appends `n` bytes that stay valid and unchanged until the next Sync or Close returns or the
  // file is destroyed, so that the file may write them from `data` in the background without
  // copying them (the POSIX file does so for the 4 KiB-aligned part of runs of at least 1 MiB at
  // 4 KiB-aligned addresses and file offsets). The default copies, as Append.
  virtual Status AppendStable(const void* data, size_t n) { return Append(data, n); }
  // Writes out pending and buffered bytes and fdatasyncs: after OK, the bytes survive a crash.
  virtual Status Sync() = 0;
  // Sync, then close. The file holds exactly the appended bytes.
  virtual Status Close() = 0;
  // Bytes appended so far.
  virtual uint64_t size() const = 0;
};

class ReadableFile {
 public:
  virtual ~ReadableFile() = default;
  // Reads exactly `n` bytes at `offset`; DataLoss when the file is shorter, IOError on EIO.
  virtual Status ReadAt(uint64_t offset, void* dst, size_t n) = 0;
  virtual uint64_t size() const = 0;
};

class FileSystem {
 public:
  virtual ~FileSystem() = default;
  // Creates or truncates `path`.
  virtual Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path,
                                                                const WriteOptions& options = {}) = 0;
  virtual Result<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& path) = 0;
  // mkdir -p, mode 0700 for new directories.
  virtual Status CreateDirs(const std::string& path) = 0;
  // fsyncs a directory, making renames and creations inside it durable.
  virtual Status SyncDir(const std::string& path) = 0;
  // Atomic replace within one file system.
  virtual Status Rename(const std::string& from, const std::string& to) = 0;
  virtual Status RemoveFile(const std::string& path) = 0;
  // rm -rf; OK when it does not exist.
  virtual Status RemoveAll(const std::string& path) = 0;
  // Names (not paths) of the entries of a directory, sorted. NotFound when it does not exist.
  virtual Result<std::vector<std::string>> ListDir(const std::string& path) = 0;
  virtual bool Exists(const std::string& path) = 0;
  // Size in bytes of a regular file.
  virtual Result<uint64_t> FileSize(const std::string& path) = 0;
};

// The process-wide POSIX file system.
FileSystem* PosixFileSystem();

// Reads a whole (small) file.
// A directory only this user may enter, for job data (the agent's catalog, memento-run's work
// directory): created (mkdir -p) when missing, then checked to be a real directory (not a link)
// owned by this process's effective uid, and made mode 0700. `what` names it in errors.
Status MakePrivateDir(const std::string& dir, const std::string& what);

Result<std::string> ReadFileToString(FileSystem* fs, const std::string& path);
// Writes `data` to `path` atomically: a temporary name in the same directory, fsync, rename,
// fsync of the directory. A crash leaves either the old file or the new one, never a torn one.
Status WriteFileAtomically(FileSystem* fs, const std::string& path, const std::string& data);

// A wrapper that injects faults (RocksDB's FaultInjectionTestFS). Thread-safe.
// Spec (also accepted by memento-agent --inject-fs and MEMENTO_FAULT_FS), comma-separated:
//   enospc_after=N         every write after N bytes in all fails with ENOSPC
//   enospc_while=PATH      writes fail with ENOSPC while PATH exists ("space returns" on delete)
//   eio_after=N            every write after N bytes fails with EIO
//   eio_read=SUBSTR        reads of paths containing SUBSTR fail with EIO
//   short_writes=1         each write(2) writes at most half of what was asked (must be retried)
class FaultInjectionFileSystem : public FileSystem {
 public:
  static Result<std::unique_ptr<FaultInjectionFileSystem>> FromSpec(FileSystem* base, const std::string& spec);
  explicit FaultInjectionFileSystem(FileSystem* base);
  ~FaultInjectionFileSystem() override;

  void FailWritesAfter(uint64_t bytes, int error);  // error: ENOSPC or EIO
  void FailWritesWhileExists(const std::string& path);
  void FailReadsOf(const std::string& substring);
  void SetShortWrites(bool on);
  // Simulates a crash: every file written through this wrapper is cut back to what was last
  // synced, and files created but never synced (nor their directory) disappear.
  Status DropUnsyncedData();
  // How many faults were injected so far: tests prove the fault happened.
  uint64_t injected_faults() const;

  Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path, const WriteOptions& options = {}) override;
  Result<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& path) override;
  Status CreateDirs(const std::string& path) override;
  Status SyncDir(const std::string& path) override;
  Status Rename(const std::string& from, const std::string& to) override;
  Status RemoveFile(const std::string& path) override;
  Status RemoveAll(const std::string& path) override;
  Result<std::vector<std::string>> ListDir(const std::string& path) override;
  bool Exists(const std::string& path) override;
  Result<uint64_t> FileSize(const std::string& path) override;

 private:
  struct State;
  std::shared_ptr<State> state_;
  FileSystem* base_;
};

}  // namespace memento
