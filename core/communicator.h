// Agent-to-agent traffic goes through this interface (STYLE.md 4): MPI in production, and
// fault-injecting wrappers in tests. One thread uses a Communicator at a time.
#pragma once

#include <cstddef>

#include "core/status.h"

namespace memento {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Every member contributes `bytes` bytes; `out` receives size() * bytes, member i's at i * bytes.
  virtual Status Allgather(const void* in, size_t bytes, void* out) = 0;
};

}  // namespace memento
