// POSIX shared memory; errors converted through core/posix_error.h.
#include "core/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cstdio>

#include "core/posix_error.h"

namespace memento {

Result<std::unique_ptr<SharedMemory>> SharedMemory::Create(const std::string& name, size_t bytes) {
  int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return PosixError("shm_open(" + name + ", create)");
  // shm_open honours the umask; make the mode exact.
  ::fchmod(fd, 0600);
  int err = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (err != 0) {
    ::close(fd);
    ::shm_unlink(name.c_str());
    return PosixError("reserving " + FormatBytes(bytes) + " for shared memory " + name + " (free in /dev/shm: " +
                          FormatBytes(SharedMemoryFreeBytes()) + ")",
                      err);
  }
  void* p = bytes ? ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : nullptr;
  ::close(fd);
  if (p == MAP_FAILED) {
    Status st = PosixError("mmap(" + name + ")");
    ::shm_unlink(name.c_str());
    return st;
  }
  return std::unique_ptr<SharedMemory>(new SharedMemory(name, static_cast<uint8_t*>(p), bytes));
}

Result<std::unique_ptr<SharedMemory>> SharedMemory::Open(const std::string& name, size_t bytes, bool writable,
                                                         bool populate) {
  int fd = ::shm_open(name.c_str(), writable ? O_RDWR : O_RDONLY, 0600);
  if (fd < 0) return PosixError("shm_open(" + name + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    Status s = PosixError("fstat(" + name + ")");
    ::close(fd);
    return s;
  }
  if (static_cast<size_t>(st.st_size) != bytes) {
    ::close(fd);
    return DataLoss("shared memory " + name + " has " + std::to_string(st.st_size) + " bytes, expected " +
                    std::to_string(bytes));
  }
  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  int flags = MAP_SHARED | (populate ? MAP_POPULATE : 0);
  void* p = bytes ? ::mmap(nullptr, bytes, prot, flags, fd, 0) : nullptr;
  ::close(fd);
  if (p == MAP_FAILED) return PosixError("mmap(" + name + ")");
  return std::unique_ptr<SharedMemory>(new SharedMemory(name, static_cast<uint8_t*>(p), bytes));
}

Status SharedMemory::Unlink(const std::string& name) {
  if (::shm_unlink(name.c_str()) != 0) return PosixError("shm_unlink(" + name + ")");
  return Status::Ok();
}

bool SharedMemory::Exists(const std::string& name) {
  int fd = ::shm_open(name.c_str(), O_RDONLY, 0);
  if (fd < 0) return false;
  ::close(fd);
  return true;
}

Status SharedMemory::Resize(size_t bytes) {
  if (bytes == size_) return Status::Ok();
  int fd = ::shm_open(name_.c_str(), O_RDWR, 0600);
  if (fd < 0) return PosixError("shm_open(" + name_ + ")");
  if (bytes > size_) {
    int err = ::posix_fallocate(fd, static_cast<off_t>(size_), static_cast<off_t>(bytes - size_));
    if (err != 0) {
      ::ftruncate(fd, static_cast<off_t>(size_));  // gives back what the failed reservation took
      ::close(fd);
      return PosixError("growing shared memory " + name_ + " from " + FormatBytes(size_) + " to " + FormatBytes(bytes) +
                            " (free in /dev/shm: " + FormatBytes(SharedMemoryFreeBytes()) + ")",
                        err);
    }
  }
  void* p = bytes ? ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : nullptr;
  if (p == MAP_FAILED) {
    Status st = PosixError("mmap(" + name_ + ") at " + FormatBytes(bytes));
    if (bytes > size_) ::ftruncate(fd, static_cast<off_t>(size_));
    ::close(fd);
    return st;
  }
  if (bytes < size_ && ::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    Status st = PosixError("shrinking shared memory " + name_ + " to " + FormatBytes(bytes));
    if (p != nullptr) ::munmap(p, bytes);
    ::close(fd);
    return st;
  }
  ::close(fd);
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = static_cast<uint8_t*>(p);
  size_ = bytes;
  return Status::Ok();
}

SharedMemory::~SharedMemory() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

uint64_t SharedMemoryFreeBytes() {
  struct statvfs vfs {};
  if (::statvfs("/dev/shm", &vfs) != 0) return 0;
  return static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
}

std::string FormatBytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0) {
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  } else {
    std::snprintf(buf, sizeof buf, "%.1f %s", v, units[u]);
  }
  return buf;
}

}  // namespace memento
