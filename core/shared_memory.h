// Named POSIX shared-memory segments (shm_open + mmap), the home of every slot: created by the
// agent (mode 0600), mapped by the agent and by the rank that fills it. Survives the crash of
// both processes until unlinked. Not thread-safe to move; the mapping itself may be shared.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"

namespace memento {

class SharedMemory {
 public:
  // Creates `name` (which starts with '/') of `bytes`, mode 0600, and reserves its memory up front
  // (posix_fallocate) so that a full /dev/shm fails here, not with SIGBUS later. Fails with
  // AlreadyExists when it exists.
  static Result<std::unique_ptr<SharedMemory>> Create(const std::string& name, size_t bytes);
  // Maps an existing segment; fails when its size differs from `bytes`.
  // `populate` pre-faults the pages (MAP_POPULATE), so first writes do not fault.
  static Result<std::unique_ptr<SharedMemory>> Open(const std::string& name, size_t bytes,
                                                    bool writable, bool populate = false);
  // Removes the name; mappings stay valid. NotFound when it does not exist.
  static Status Unlink(const std::string& name);
  static bool Exists(const std::string& name);

  // Gives the segment `bytes` (its name must still exist), remapping it: shrinking frees the tail,
  // growing reserves the new pages as Create does. The bytes below both sizes keep their contents;
  // earlier pointers into the segment are invalid after it. On failure the segment is unchanged.
  Status Resize(size_t bytes);

  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }

 private:
  SharedMemory(std::string name, uint8_t* data, size_t size) : name_(std::move(name)), data_(data), size_(size) {}
  std::string name_;
  uint8_t* data_;
  size_t size_;
};

// Bytes free in /dev/shm for an unprivileged user (statvfs), or 0 when it cannot be read.
uint64_t SharedMemoryFreeBytes();

// "1.5 GiB", "300 MiB", "12 B".
std::string FormatBytes(uint64_t bytes);

}  // namespace memento
