// The POSIX FileSystem (aligned buffered writes behind the caller on a per-file I/O thread, O_DIRECT
// where allowed, fdatasync/fsync of files and directories) and FaultInjectionFileSystem, which
// fails, splits or drops writes for tests.
#include "core/file_system.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

#include "core/posix_error.h"

namespace memento {
namespace {

// O_DIRECT needs buffer address, file offset and length aligned to the logical block size; 4 KiB
// covers every device we run on.
constexpr size_t kDirectAlign = 4096;

size_t RoundUp(size_t n, size_t align) { return (n + align - 1) / align * align; }

// Closes `fd`, retrying nothing: after EINTR the descriptor is already released on Linux.
Status CloseFd(int fd, const std::string& path) {
  if (::close(fd) != 0 && errno != EINTR) return PosixError("close(" + path + ")");
  return Status::Ok();
}

// Appends of at least this many (aligned, with O_DIRECT) bytes are written from the caller's memory
// without a copy into a buffer: AppendStable's behind the caller, Append's before it returns.
// Smaller ones are not worth a write of their own and are copied.
constexpr size_t kInPlaceMinBytes = size_t{1} << 20;
// Write buffers per file: the caller fills one while the I/O thread writes the other.
constexpr size_t kWriteBuffers = 2;
// Writes queued for the I/O thread at most (the one in progress included); Append and
// AppendStable wait beyond that, so that a failure surfaces within a few writes.

// Writes through 4 KiB-aligned buffers of WriteOptions::buffer_bytes with pwrite at explicit
// offsets, behind the caller: a full buffer (or a run of stable caller memory, AppendStable) is
// queued for a per-file I/O thread, started on the first queued write and joined by Sync, Close and
// the destructor, while the caller fills the other buffer. Invariant: the logical content is the
// file's first `written_` bytes once the queued writes are done, followed by buf_[0, buffered_).
// With O_DIRECT, `written_` stays a multiple of 4 KiB: Sync writes a tail that is not a whole block
// zero-padded, keeps it in the buffer (the next write rewrites that block), and ftruncates the file
// to its logical size.
// A failed queued write halts the I/O thread with the write still queued; the next Append, Sync or
// Close reports it, and the next wait for a write resumes the thread, which retries it. So after an
// error the state stays consistent (size() counts the bytes taken) and nothing taken is lost, but
// callers normally abandon the file and write it again.
// Destroying the file without Close abandons the bytes not yet written out, like a crash.
// Thread safety: one caller thread (WritableFile's contract); the I/O thread touches only mu_'s
// fields, the queued jobs' memory, and what WriteAll changes (direct_, file_end_), which the caller
// reads only with no write in progress.
class PosixWritableFile final : public WritableFile {
 public:
  PosixWritableFile(std::string path, int fd, bool direct, char* buf, size_t capacity, size_t max_queued)
      : path_(std::move(path)), fd_(fd), direct_(direct), capacity_(capacity), max_queued_(max_queued),
        buffers_{buf}, buf_(buf) {}
  ~PosixWritableFile() override {
    StopIo();
    if (fd_ >= 0) ::close(fd_);
    for (char* b : buffers_) std::free(b);
  }
  PosixWritableFile(const PosixWritableFile&) = delete;
  PosixWritableFile& operator=(const PosixWritableFile&) = delete;

  // A long aligned run is written from `data` in this thread once the queued writes are done (a
  // copy into the buffer costs more than the overlap gains, measured); the rest is copied.
  Status Append(const void* data, size_t n) override {
    if (fd_ < 0) return FailedPrecondition("append to " + path_ + " after Close");
    MEMENTO_RETURN_IF_ERROR(TakeError());
    const char* p = static_cast<const char*>(data);
    if (const size_t in_place = InPlaceBytes(p, n); in_place > 0) {
      if (buffered_ > 0) MEMENTO_RETURN_IF_ERROR(QueueBuffer());
      MEMENTO_RETURN_IF_ERROR(Drain());
      MEMENTO_RETURN_IF_ERROR(WriteAll(p, in_place, written_));
      written_ += in_place;
      size_ += in_place;
      tail_on_disk_ = false;
      p += in_place;
      n -= in_place;
    }
    return CopyIn(p, n);
  }

  Status AppendStable(const void* data, size_t n) override {
    if (fd_ < 0) return FailedPrecondition("append to " + path_ + " after Close");
    MEMENTO_RETURN_IF_ERROR(TakeError());
    const char* p = static_cast<const char*>(data);
    if (const size_t in_place = InPlaceBytes(p, n); in_place > 0) {
      // Buffered bytes go first; with O_DIRECT they are whole blocks here (size_ is aligned).
      if (buffered_ > 0) MEMENTO_RETURN_IF_ERROR(QueueBuffer());
      MEMENTO_RETURN_IF_ERROR(Queue(p, in_place, nullptr));
      size_ += in_place;
      tail_on_disk_ = false;
      p += in_place;
      n -= in_place;
    }
    return CopyIn(p, n);
  }

  Status Sync() override {
    if (fd_ < 0) return FailedPrecondition("sync of " + path_ + " after Close");
    MEMENTO_RETURN_IF_ERROR(Drain());
    StopIo();
    if (buffered_ > 0 && !tail_on_disk_) MEMENTO_RETURN_IF_ERROR(WriteBuffer());
    tail_on_disk_ = true;
    if (file_end_ > size_) {
      // A zero-padded O_DIRECT tail (or a failed write) left bytes past the logical end.
      if (::ftruncate(fd_, static_cast<off_t>(size_)) != 0) return PosixError("ftruncate(" + path_ + ")");
      file_end_ = size_;
    }
    if (::fdatasync(fd_) != 0) return PosixError("fdatasync(" + path_ + ")");
    return Status::Ok();
  }

  Status Close() override {
    if (fd_ < 0) return FailedPrecondition("close of " + path_ + " twice");
    Status synced = Sync();
    StopIo();  // after a failed Sync, abandons the writes still queued
    const int fd = std::exchange(fd_, -1);
    Status closed = CloseFd(fd, path_);
    return synced.ok() ? closed : synced;
  }

  uint64_t size() const override { return size_; }

 private:
  // A write for the I/O thread: `len` bytes at `data` to file offset `offset`. `buffer` is the
  // write buffer holding them, returned to free_ when written, or nullptr for caller memory.
  struct Job {
    const char* data;
    size_t len;
    uint64_t offset;
    char* buffer;
  };

  // Copies into the buffers, queueing each one that fills when more bytes follow.
  Status CopyIn(const char* p, size_t n) {
    while (n > 0) {
      if (buf_ == nullptr) MEMENTO_RETURN_IF_ERROR(AcquireBuffer());
      if (buffered_ == capacity_) {
        MEMENTO_RETURN_IF_ERROR(QueueBuffer());
        continue;
      }
      const size_t take = std::min(n, capacity_ - buffered_);
      std::memcpy(buf_ + buffered_, p, take);
      buffered_ += take;
      size_ += take;
      tail_on_disk_ = false;
      p += take;
      n -= take;
    }
    return Status::Ok();
  }

  // How many of the `n` bytes at `p` can be written from there: the aligned part of a long run at
  // an aligned address and file offset with O_DIRECT, a long run anywhere without; else 0.
  size_t InPlaceBytes(const char* p, size_t n) const {
    if (n < kInPlaceMinBytes) return 0;
    if (!direct_.load(std::memory_order_relaxed)) return n;
    if (reinterpret_cast<uintptr_t>(p) % kDirectAlign != 0 || size_ % kDirectAlign != 0) return 0;
    const size_t aligned = n / kDirectAlign * kDirectAlign;
    return aligned >= kInPlaceMinBytes ? aligned : 0;
  }

  // Queues buf_[0, buffered_) for writing at `written_`; the caller holds no buffer afterwards.
  Status QueueBuffer() {
    MEMENTO_RETURN_IF_ERROR(Queue(buf_, buffered_, buf_));
    buf_ = nullptr;
    buffered_ = 0;
    return Status::Ok();
  }

  // Queues a write of `len` bytes at `data` at file offset `written_`, then advances `written_`.
  // On error nothing is queued.
  Status Queue(const char* data, size_t len, char* buffer) {
    if (!io_.joinable()) {
      try {
        io_ = std::thread([this] { WriteBehind(); });
      } catch (const std::system_error& e) {
        return PosixError("starting the I/O thread of " + path_, e.code().value());
      }
    }
    std::unique_lock<std::mutex> lock(mu_);
    MEMENTO_RETURN_IF_ERROR(WaitFor(lock, [&] { return jobs_.size() < max_queued_; }));
    jobs_.push_back(Job{data, len, written_, buffer});
    halted_ = false;
    cv_.notify_all();
    written_ += len;
    return Status::Ok();
  }

  // Makes buf_ an empty buffer: a free one, a new one while fewer than kWriteBuffers exist, or the
  // next one the I/O thread finishes with.
  Status AcquireBuffer() {
    std::unique_lock<std::mutex> lock(mu_);
    if (free_.empty() && buffers_.size() < kWriteBuffers) {
      lock.unlock();
      void* b = nullptr;
      if (const int err = ::posix_memalign(&b, kDirectAlign, capacity_); err != 0) {
        return PosixError("allocating a " + std::to_string(capacity_) + "-byte write buffer for " + path_, err);
      }
      buffers_.push_back(static_cast<char*>(b));
      buf_ = buffers_.back();
      return Status::Ok();
    }
    MEMENTO_RETURN_IF_ERROR(WaitFor(lock, [&] { return !free_.empty(); }));
    buf_ = free_.back();
    free_.pop_back();
    return Status::Ok();
  }

  // Waits until every queued write is done.
  Status Drain() {
    if (!io_.joinable()) return Status::Ok();
    std::unique_lock<std::mutex> lock(mu_);
    return WaitFor(lock, [&] { return jobs_.empty(); });
  }

  // The failure of a queued write not reported yet, or OK; reporting it clears it.
  Status TakeError() {
    if (!io_.joinable()) return Status::Ok();
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(error_, Status::Ok());
  }

  // Reports a pending failure; else waits until `done` holds, resuming a halted I/O thread (the
  // retry of the failed write), and reports a failure that comes first.
  template <typename Pred>
  Status WaitFor(std::unique_lock<std::mutex>& lock, Pred done) {
    if (!error_.ok()) return std::exchange(error_, Status::Ok());
    if (done()) return Status::Ok();
    halted_ = false;
    cv_.notify_all();
    cv_.wait(lock, [&] { return done() || !error_.ok(); });
    if (!error_.ok()) return std::exchange(error_, Status::Ok());
    return Status::Ok();
  }

  // Joins the I/O thread, leaving queued writes (there are none after a successful Drain) queued.
  void StopIo() {
    if (!io_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    io_.join();
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = false;
  }

  // The I/O thread: writes the queued jobs in order; halts on a failure, keeping the job queued.
  void WriteBehind() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || (!halted_ && !jobs_.empty()); });
      if (stop_) return;
      const Job job = jobs_.front();
      lock.unlock();
      Status st = WriteAll(job.data, job.len, job.offset);
      lock.lock();
      if (st.ok()) {
        if (job.buffer != nullptr) free_.push_back(job.buffer);
        jobs_.pop_front();
      } else {
        error_ = std::move(st);
        halted_ = true;
      }
      cv_.notify_all();
    }
  }

  // Writes buf_ at `written_` in the calling thread (no queued writes, no I/O thread). Without
  // O_DIRECT everything goes and the buffer empties; with it, the whole blocks go with the partial
  // last block zero-padded, and that partial block stays buffered.
  Status WriteBuffer() {
    size_t len = buffered_;
    const bool direct = direct_.load(std::memory_order_relaxed);
    if (direct) {
      const size_t padded = RoundUp(buffered_, kDirectAlign);
      std::memset(buf_ + buffered_, 0, padded - buffered_);
      len = padded;
    }
    MEMENTO_RETURN_IF_ERROR(WriteAll(buf_, len, written_));
    const size_t done = direct ? buffered_ / kDirectAlign * kDirectAlign : buffered_;
    if (done < buffered_) std::memmove(buf_, buf_ + done, buffered_ - done);
    buffered_ -= done;
    written_ += done;
    return Status::Ok();
  }

  // pwrite of exactly `n` bytes at `offset`, looping over short writes and EINTR. Runs on the I/O
  // thread, or on the caller's while no write is queued.
  Status WriteAll(const char* p, size_t n, uint64_t offset) {
    while (n > 0) {
      const ssize_t w = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
      if (w < 0) {
        if (errno == EINTR) continue;
        // Some file systems accept O_DIRECT at open and refuse it at write: go buffered.
        if (errno == EINVAL && direct_.load(std::memory_order_relaxed) && DropDirect()) continue;
        return PosixError("write(" + path_ + ")");
      }
      if (w == 0) return IOError("write(" + path_ + "): wrote 0 of " + std::to_string(n) + " bytes");
      const size_t wrote = static_cast<size_t>(w);
      p += wrote;
      n -= wrote;
      offset += wrote;
      file_end_ = std::max(file_end_, offset);
      // A short O_DIRECT write that ends mid-block leaves the rest unaligned.
      if (n > 0 && direct_.load(std::memory_order_relaxed) && (wrote % kDirectAlign) != 0 && !DropDirect()) {
        return PosixError("fcntl(" + path_ + ", clear O_DIRECT)");
      }
    }
    return Status::Ok();
  }

  // Clears O_DIRECT on the descriptor; later writes go through the page cache.
  bool DropDirect() {
    const int flags = ::fcntl(fd_, F_GETFL);
    if (flags < 0 || ::fcntl(fd_, F_SETFL, flags & ~O_DIRECT) != 0) return false;
    direct_.store(false, std::memory_order_relaxed);
    return true;
  }

  const std::string path_;
  int fd_;                        // -1 after Close
  // O_DIRECT is set on fd_. Only ever cleared, by WriteAll; the caller reads it racily only to
  // choose in-place writes, which a stale `true` merely restricts.
  std::atomic<bool> direct_;
  const size_t capacity_;         // bytes of each buffer, a multiple of 4 KiB
  const size_t max_queued_;       // writes queued for the I/O thread at most
  uint64_t file_end_ = 0;         // highest byte offset written, padding included (see WriteAll)

  // The caller's.
  std::vector<char*> buffers_;    // every write buffer, 4 KiB-aligned, owned (posix_memalign)
  char* buf_;                     // the buffer being filled; nullptr until the next byte copied
  size_t buffered_ = 0;           // bytes in buf_
  uint64_t written_ = 0;          // bytes of the logical content written or queued
  uint64_t size_ = 0;             // bytes appended
  bool tail_on_disk_ = false;     // buf_ (a partial O_DIRECT block) is already in the file
  std::thread io_;                // the I/O thread; joinable while running

  std::mutex mu_;
  std::condition_variable cv_;    // jobs_, free_, error_, halted_ or stop_ changed
  std::deque<Job> jobs_;          // GUARDED_BY(mu_) in order; the front one is being written
  std::vector<char*> free_;       // GUARDED_BY(mu_) buffers neither filled nor queued
  Status error_;                  // GUARDED_BY(mu_) a failed write not reported yet
  bool halted_ = false;           // GUARDED_BY(mu_) the front job failed; wait for a retry
  bool stop_ = false;             // GUARDED_BY(mu_) the I/O thread is to exit
};

class PosixReadableFile final : public ReadableFile {
 public:
  PosixReadableFile(std::string path, int fd, uint64_t size) : path_(std::move(path)), fd_(fd), size_(size) {}
  ~PosixReadableFile() override { ::close(fd_); }
  PosixReadableFile(const PosixReadableFile&) = delete;
  PosixReadableFile& operator=(const PosixReadableFile&) = delete;

  Status ReadAt(uint64_t offset, void* dst, size_t n) override {
    char* p = static_cast<char*>(dst);
    uint64_t at = offset;
    size_t left = n;
    while (left > 0) {
      const ssize_t r = ::pread(fd_, p, left, static_cast<off_t>(at));
      if (r < 0) {
        if (errno == EINTR) continue;
        return PosixError("read(" + path_ + ")");
      }
      if (r == 0) {
        struct stat st {};
        const uint64_t file_size = ::fstat(fd_, &st) == 0 ? static_cast<uint64_t>(st.st_size) : at;
        return DataLoss(path_ + ": wanted " + std::to_string(n) + " bytes at offset " + std::to_string(offset) +
                        ", file has " + std::to_string(file_size));
      }
      p += r;
      at += static_cast<uint64_t>(r);
      left -= static_cast<size_t>(r);
    }
    return Status::Ok();
  }

  uint64_t size() const override { return size_; }

 private:
  const std::string path_;
  const int fd_;
  const uint64_t size_;  // at open
};

Status RemoveTree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return PosixError("lstat(" + path + ")");
  }
  if (!S_ISDIR(st.st_mode)) {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return PosixError("unlink(" + path + ")");
    return Status::Ok();
  }
  DIR* dir = ::opendir(path.c_str());
  if (dir == nullptr) return PosixError("opendir(" + path + ")");
  std::vector<std::string> names;
  errno = 0;
  while (const dirent* e = ::readdir(dir)) {
    const std::string_view name = e->d_name;
    if (name != "." && name != "..") names.emplace_back(name);
    errno = 0;
  }
  const int read_errno = errno;
  ::closedir(dir);
  if (read_errno != 0) return PosixError("readdir(" + path + ")", read_errno);
  for (const std::string& name : names) MEMENTO_RETURN_IF_ERROR(RemoveTree(path + "/" + name));
  if (::rmdir(path.c_str()) != 0 && errno != ENOENT) return PosixError("rmdir(" + path + ")");
  return Status::Ok();
}

class PosixFileSystemImpl final : public FileSystem {
 public:
  Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path,
                                                        const WriteOptions& options) override {
    const int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
    const mode_t mode = static_cast<mode_t>(options.mode);
    bool direct = options.direct_io;
    int fd = direct ? ::open(path.c_str(), flags | O_DIRECT, mode) : -1;
    if (fd < 0 && direct) {
      if (errno != EINVAL) return PosixError("open(" + path + ")");
      direct = false;  // e.g. tmpfs on older kernels
    }
    if (fd < 0) fd = ::open(path.c_str(), flags, mode);
    if (fd < 0) return PosixError("open(" + path + ")");
    // open() honours the umask; make the mode exact.
    if (::fchmod(fd, mode) != 0) {
      Status st = PosixError("fchmod(" + path + ")");
      ::close(fd);
      return st;
    }
    const size_t capacity = RoundUp(std::max<size_t>(options.buffer_bytes, 1), kDirectAlign);
    void* buf = nullptr;
    if (const int err = ::posix_memalign(&buf, kDirectAlign, capacity); err != 0) {
      ::close(fd);
      return PosixError("allocating a " + std::to_string(capacity) + "-byte write buffer for " + path, err);
    }
    return std::unique_ptr<WritableFile>(
        new PosixWritableFile(path, fd, direct, static_cast<char*>(buf), capacity,
                              std::max<size_t>(1, options.max_queued_writes)));
  }

  Result<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& path) override {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return PosixError("open(" + path + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      Status s = PosixError("fstat(" + path + ")");
      ::close(fd);
      return s;
    }
    return std::unique_ptr<ReadableFile>(new PosixReadableFile(path, fd, static_cast<uint64_t>(st.st_size)));
  }

  Status CreateDirs(const std::string& path) override {
    if (path.empty()) return InvalidArgument("CreateDirs: empty path");
    // Every prefix ending before a '/', then the whole path.
    for (size_t end = path.find('/', 1);; end = path.find('/', end + 1)) {
      const std::string prefix = path.substr(0, end);
      if (!prefix.empty() && prefix.back() != '/') MEMENTO_RETURN_IF_ERROR(MakeDir(prefix));
      if (end == std::string::npos) break;
    }
    return Status::Ok();
  }

  Status SyncDir(const std::string& path) override {
    const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return PosixError("open(" + path + ")");
    if (::fsync(fd) != 0) {
      Status st = PosixError("fsync(" + path + ")");
      ::close(fd);
      return st;
    }
    return CloseFd(fd, path);
  }

  Status Rename(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) return PosixError("rename(" + from + ", " + to + ")");
    return Status::Ok();
  }

  Status RemoveFile(const std::string& path) override {
    if (::unlink(path.c_str()) != 0) return PosixError("unlink(" + path + ")");
    return Status::Ok();
  }

  Status RemoveAll(const std::string& path) override { return RemoveTree(path); }

  Result<std::vector<std::string>> ListDir(const std::string& path) override {
    DIR* dir = ::opendir(path.c_str());
    if (dir == nullptr) return PosixError("opendir(" + path + ")");
    std::vector<std::string> names;
    errno = 0;
    while (const dirent* e = ::readdir(dir)) {
      const std::string_view name = e->d_name;
      if (name != "." && name != "..") names.emplace_back(name);
      errno = 0;
    }
    const int read_errno = errno;
    ::closedir(dir);
    if (read_errno != 0) return PosixError("readdir(" + path + ")", read_errno);
    std::sort(names.begin(), names.end());
    return names;
  }

  bool Exists(const std::string& path) override {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0;
  }

  Result<uint64_t> FileSize(const std::string& path) override {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return PosixError("stat(" + path + ")");
    if (!S_ISREG(st.st_mode)) return FailedPrecondition(path + " is not a regular file");
    return static_cast<uint64_t>(st.st_size);
  }

 private:
  static Status MakeDir(const std::string& dir) {
    if (::mkdir(dir.c_str(), 0700) == 0) {
      // mkdir honours the umask; make the mode exact.
      if (::chmod(dir.c_str(), 0700) != 0) return PosixError("chmod(" + dir + ")");
      return Status::Ok();
    }
    const int err = errno;
    struct stat st {};
    if (err == EEXIST && ::stat(dir.c_str(), &st) == 0) {
      if (S_ISDIR(st.st_mode)) return Status::Ok();
      return PosixError("mkdir(" + dir + ")", ENOTDIR);
    }
    return PosixError("mkdir(" + dir + ")", err);
  }
};

// Directory part of `path` for SyncDir: "." for a bare name, "/" for a file in the root.
std::string ParentDir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

Status MakePrivateDir(const std::string& dir, const std::string& what) {
  if (dir.empty()) return InvalidArgument(what + ": empty path");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return IOError("creating " + what + " " + dir + ": " + ec.message());
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) return PosixError("lstat(" + dir + ")");
  if (S_ISLNK(st.st_mode)) {
    return FailedPrecondition(what + " " + dir + " is a symbolic link: refusing to keep job data behind it");
  }
  if (!S_ISDIR(st.st_mode)) return FailedPrecondition(what + " " + dir + " is not a directory");
  if (st.st_uid != ::geteuid()) {
    return FailedPrecondition(what + " " + dir + " belongs to uid " + std::to_string(st.st_uid) + ", not to uid " +
                              std::to_string(::geteuid()) + " that runs this job: refusing to keep job data there");
  }
  if ((st.st_mode & 07777) != 0700 && ::chmod(dir.c_str(), 0700) != 0) {
    return PosixError("chmod 0700 " + what + " " + dir);
  }
  return Status::Ok();
}

FileSystem* PosixFileSystem() {
  static PosixFileSystemImpl* const fs = new PosixFileSystemImpl();  // never destroyed: usable at exit
  return fs;
}

Result<std::string> ReadFileToString(FileSystem* fs, const std::string& path) {
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> file, fs->NewReadableFile(path));
  std::string data(file->size(), '\0');
  MEMENTO_RETURN_IF_ERROR(file->ReadAt(0, data.data(), data.size()));
  return data;
}

Status WriteFileAtomically(FileSystem* fs, const std::string& path, const std::string& data) {
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  WriteOptions options;
  options.direct_io = false;  // small metadata files: the page cache is fine
  options.buffer_bytes = std::clamp<size_t>(data.size(), 1, options.buffer_bytes);
  Status st = [&]() -> Status {
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, fs->NewWritableFile(tmp, options));
    MEMENTO_RETURN_IF_ERROR(file->Append(data.data(), data.size()));
    return file->Close();  // Close syncs
  }();
  if (st.ok()) st = fs->Rename(tmp, path);
  if (!st.ok()) {
    if (fs->Exists(tmp)) fs->RemoveFile(tmp).IgnoreError();  // the original error is the one to report
    return st;
  }
  return fs->SyncDir(ParentDir(path));
}


// ---- FaultInjectionFileSystem ----

namespace {

// What a FaultInjectionFileSystem and the files it opened share; files may outlive the wrapper.
struct FaultState {
  // What DropUnsyncedData needs to know about a file written through the wrapper.
  struct FileRecord {
    uint64_t synced_size = 0;  // bytes at the last successful Sync or Close
    bool ever_synced = false;  // false: created but never synced, so a crash loses it
  };

  explicit FaultState(FileSystem* base_fs) : base(base_fs) {}

  // The error an Append of `n` bytes to `path` fails with, or OK, in which case the bytes count as
  // written. Thresholds are on bytes appended through all files: an Append that would cross one
  // fails whole, so exactly the threshold gets written.
  Status ChargeAppend(const std::string& path, uint64_t n) {
    const bool space_gone = SpaceGone();
    std::lock_guard<std::mutex> lock(mu);
    int err = space_gone ? ENOSPC : 0;
    for (const auto& [error, after] : fail_after) {
      if (err == 0 && bytes_written + n > after) err = error;
    }
    if (err != 0) {
      ++injected_faults;
      return PosixError("write(" + path + ")", err);
    }
    bytes_written += n;
    return Status::Ok();
  }

  // Sync and Close write out buffered bytes, so they fail too while enospc_while's path exists.
  Status ChargeSync(const std::string& path) {
    if (!SpaceGone()) return Status::Ok();
    std::lock_guard<std::mutex> lock(mu);
    ++injected_faults;
    return PosixError("write(" + path + ")", ENOSPC);
  }

  Status ChargeRead(const std::string& path) {
    std::lock_guard<std::mutex> lock(mu);
    if (eio_read.empty() || path.find(eio_read) == std::string::npos) return Status::Ok();
    ++injected_faults;
    return PosixError("read(" + path + ")", EIO);
  }

  // Whether an Append of `n` bytes is split; counts the split as a fault.
  bool SplitAppend(size_t n) {
    std::lock_guard<std::mutex> lock(mu);
    if (!short_writes || n < 2) return false;
    ++injected_faults;
    return true;
  }

  void RecordSync(const std::string& path, uint64_t size) {
    std::lock_guard<std::mutex> lock(mu);
    FileRecord& r = files[path];
    r.synced_size = size;
    r.ever_synced = true;
  }

  FileSystem* const base;
  mutable std::mutex mu;
  uint64_t bytes_written = 0;               // GUARDED_BY(mu) appended through every file, in bytes
  std::map<int, uint64_t> fail_after;       // GUARDED_BY(mu) errno -> bytes after which appends fail
  std::string enospc_while;                 // GUARDED_BY(mu) a path; empty: off
  std::string eio_read;                     // GUARDED_BY(mu) a path substring; empty: off
  bool short_writes = false;                // GUARDED_BY(mu)
  uint64_t injected_faults = 0;             // GUARDED_BY(mu)
  std::map<std::string, FileRecord> files;  // GUARDED_BY(mu) by path

 private:
  bool SpaceGone() {
    std::string path;
    {
      std::lock_guard<std::mutex> lock(mu);
      path = enospc_while;
    }
    // Outside the lock: the base file system may be slow.
    return !path.empty() && base->Exists(path);
  }
};

class FaultInjectionWritableFile final : public WritableFile {
 public:
  FaultInjectionWritableFile(std::string path, std::unique_ptr<WritableFile> base, std::shared_ptr<FaultState> state)
      : path_(std::move(path)), base_(std::move(base)), state_(std::move(state)) {}

  // An injected failure writes nothing. Short writes hand the base at most half of what is left
  // each time, as a write(2) that must be retried would.
  Status Append(const void* data, size_t n) override { return AppendWith(&WritableFile::Append, data, n); }

  Status AppendStable(const void* data, size_t n) override {
    return AppendWith(&WritableFile::AppendStable, data, n);
  }

  Status Sync() override {
    MEMENTO_RETURN_IF_ERROR(state_->ChargeSync(path_));
    MEMENTO_RETURN_IF_ERROR(base_->Sync());
    state_->RecordSync(path_, base_->size());
    return Status::Ok();
  }

  Status Close() override {
    MEMENTO_RETURN_IF_ERROR(state_->ChargeSync(path_));
    const uint64_t size = base_->size();
    MEMENTO_RETURN_IF_ERROR(base_->Close());
    state_->RecordSync(path_, size);
    return Status::Ok();
  }

  uint64_t size() const override { return base_->size(); }

 private:
  // Append or AppendStable (`append`) of the base, with the faults above.
  Status AppendWith(Status (WritableFile::*append)(const void*, size_t), const void* data, size_t n) {
    MEMENTO_RETURN_IF_ERROR(state_->ChargeAppend(path_, n));
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const size_t piece = state_->SplitAppend(n) ? n / 2 : n;
      MEMENTO_RETURN_IF_ERROR((base_.get()->*append)(p, piece));
      p += piece;
      n -= piece;
    }
    return Status::Ok();
  }

  const std::string path_;
  const std::unique_ptr<WritableFile> base_;
  const std::shared_ptr<FaultState> state_;
};

class FaultInjectionReadableFile final : public ReadableFile {
 public:
  FaultInjectionReadableFile(std::string path, std::unique_ptr<ReadableFile> base, std::shared_ptr<FaultState> state)
      : path_(std::move(path)), base_(std::move(base)), state_(std::move(state)) {}

  Status ReadAt(uint64_t offset, void* dst, size_t n) override {
    MEMENTO_RETURN_IF_ERROR(state_->ChargeRead(path_));
    return base_->ReadAt(offset, dst, n);
  }

  uint64_t size() const override { return base_->size(); }

 private:
  const std::string path_;
  const std::unique_ptr<ReadableFile> base_;
  const std::shared_ptr<FaultState> state_;
};

// Parses a whole decimal uint64 for the fault spec's `key`.
Result<uint64_t> ParseSpecCount(const std::string& key, const std::string& value) {
  uint64_t n = 0;
  const char* end = value.data() + value.size();
  const auto [ptr, ec] = std::from_chars(value.data(), end, n);
  if (value.empty() || ec != std::errc() || ptr != end) {
    return InvalidArgument("fault spec: " + key + " wants a byte count, got '" + value + "'");
  }
  return n;
}

}  // namespace

struct FaultInjectionFileSystem::State : FaultState {
  using FaultState::FaultState;
};

Result<std::unique_ptr<FaultInjectionFileSystem>> FaultInjectionFileSystem::FromSpec(FileSystem* base,
                                                                                     const std::string& spec) {
  auto fs = std::make_unique<FaultInjectionFileSystem>(base);
  for (size_t start = 0; start <= spec.size();) {
    size_t end = spec.find(',', start);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(start, end - start);
    start = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) return InvalidArgument("fault spec: '" + item + "' is not key=value");
    const std::string key = item.substr(0, eq);
    const std::string value = item.substr(eq + 1);
    if (key == "enospc_after" || key == "eio_after") {
      MEMENTO_ASSIGN_OR_RETURN(const uint64_t bytes, ParseSpecCount(key, value));
      fs->FailWritesAfter(bytes, key == "enospc_after" ? ENOSPC : EIO);
    } else if (key == "enospc_while" || key == "eio_read") {
      if (value.empty()) return InvalidArgument("fault spec: " + key + " wants a non-empty value");
      if (key == "enospc_while") {
        fs->FailWritesWhileExists(value);
      } else {
        fs->FailReadsOf(value);
      }
    } else if (key == "short_writes") {
      if (value != "0" && value != "1") {
        return InvalidArgument("fault spec: short_writes wants 0 or 1, got '" + value + "'");
      }
      fs->SetShortWrites(value == "1");
    } else {
      return InvalidArgument("fault spec: unknown key '" + key + "'");
    }
  }
  return fs;
}

FaultInjectionFileSystem::FaultInjectionFileSystem(FileSystem* base)
    : state_(std::make_shared<State>(base)), base_(base) {}

FaultInjectionFileSystem::~FaultInjectionFileSystem() = default;

void FaultInjectionFileSystem::FailWritesAfter(uint64_t bytes, int error) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->fail_after[error] = bytes;
}

void FaultInjectionFileSystem::FailWritesWhileExists(const std::string& path) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->enospc_while = path;
}

void FaultInjectionFileSystem::FailReadsOf(const std::string& substring) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->eio_read = substring;
}

void FaultInjectionFileSystem::SetShortWrites(bool on) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->short_writes = on;
}

uint64_t FaultInjectionFileSystem::injected_faults() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->injected_faults;
}

// Cuts files with truncate(2) directly, so the base must be POSIX-backed.
Status FaultInjectionFileSystem::DropUnsyncedData() {
  std::map<std::string, State::FileRecord> files;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    files = state_->files;
  }
  Status first_error;
  std::vector<std::string> gone;  // records to forget: the file no longer exists
  for (const auto& [path, record] : files) {
    Status st;
    if (!record.ever_synced) {
      st = base_->RemoveFile(path);
      if (st.ok() || st.code() == StatusCode::kNotFound) gone.push_back(path);
    } else if (::truncate(path.c_str(), static_cast<off_t>(record.synced_size)) != 0) {
      if (errno == ENOENT) {
        gone.push_back(path);
      } else {
        st = PosixError("truncate(" + path + ")");
      }
    }
    if (!st.ok() && st.code() != StatusCode::kNotFound && first_error.ok()) first_error = st;
  }
  std::lock_guard<std::mutex> lock(state_->mu);
  for (const std::string& path : gone) state_->files.erase(path);
  return first_error;
}

Result<std::unique_ptr<WritableFile>> FaultInjectionFileSystem::NewWritableFile(const std::string& path,
                                                                                const WriteOptions& options) {
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, base_->NewWritableFile(path, options));
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->files[path] = State::FileRecord{};  // created or truncated: nothing durable yet
  }
  return std::unique_ptr<WritableFile>(new FaultInjectionWritableFile(path, std::move(file), state_));
}

Result<std::unique_ptr<ReadableFile>> FaultInjectionFileSystem::NewReadableFile(const std::string& path) {
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> file, base_->NewReadableFile(path));
  return std::unique_ptr<ReadableFile>(new FaultInjectionReadableFile(path, std::move(file), state_));
}

Status FaultInjectionFileSystem::CreateDirs(const std::string& path) { return base_->CreateDirs(path); }

Status FaultInjectionFileSystem::SyncDir(const std::string& path) { return base_->SyncDir(path); }

// Rename and removal also move or forget the file's record, so DropUnsyncedData acts on the file
// under its current name.
Status FaultInjectionFileSystem::Rename(const std::string& from, const std::string& to) {
  MEMENTO_RETURN_IF_ERROR(base_->Rename(from, to));
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->files.erase(to);
  if (auto it = state_->files.find(from); it != state_->files.end()) {
    state_->files[to] = it->second;
    state_->files.erase(it);
  }
  return Status::Ok();
}

Status FaultInjectionFileSystem::RemoveFile(const std::string& path) {
  MEMENTO_RETURN_IF_ERROR(base_->RemoveFile(path));
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->files.erase(path);
  return Status::Ok();
}

Status FaultInjectionFileSystem::RemoveAll(const std::string& path) {
  MEMENTO_RETURN_IF_ERROR(base_->RemoveAll(path));
  const std::string dir = path + "/";
  std::lock_guard<std::mutex> lock(state_->mu);
  std::erase_if(state_->files, [&](const auto& entry) {
    return entry.first == path || entry.first.compare(0, dir.size(), dir) == 0;
  });
  return Status::Ok();
}

Result<std::vector<std::string>> FaultInjectionFileSystem::ListDir(const std::string& path) {
  return base_->ListDir(path);
}

bool FaultInjectionFileSystem::Exists(const std::string& path) { return base_->Exists(path); }

Result<uint64_t> FaultInjectionFileSystem::FileSize(const std::string& path) { return base_->FileSize(path); }

}  // namespace memento
