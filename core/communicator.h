// Agent-to-agent traffic goes through this interface (STYLE.md 4): MPI in production, and
// fault-injecting wrappers in tests. One thread uses a Communicator at a time; distinct
// communicators (Duplicate, Split) may be used from distinct threads at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/status.h"

namespace memento {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Every member contributes `bytes` bytes; `out` receives size() * bytes, member i's at i * bytes.
  virtual Status Allgather(const void* in, size_t bytes, void* out) = 0;

  // A communicator over the same members with its own message space. Collective.
  virtual Result<std::unique_ptr<Communicator>> Duplicate() = 0;
  // Members with the same `color` form a new communicator, ordered by `key`. Collective.
  virtual Result<std::unique_ptr<Communicator>> Split(int color, int key) = 0;
  // `in` holds size() blocks of `block_bytes` (a multiple of 8); member i receives in `out` the
  // XOR over all members of their block i. Collective.
  virtual Status ReduceScatterXor(const void* in, void* out, size_t block_bytes) = 0;

  // Point-to-point: posts every send and receive, then waits for all of them.
  struct Message {
    int peer = -1;
    int tag = 0;
    void* data = nullptr;  // for sends, read only
    size_t bytes = 0;
  };
  virtual Status Exchange(const std::vector<Message>& sends, const std::vector<Message>& recvs) = 0;

  // An exchange in flight: its buffers must stay valid until Wait() returns. Messages of two
  // exchanges in flight with the same peer and tag match in the order they were started.
  class Pending {
   public:
    virtual ~Pending() = default;
    virtual Status Wait() = 0;  // waits for every send and receive (the destructor waits too)
  };
  // Posts every send and receive and returns at once.
  virtual Result<std::unique_ptr<Pending>> StartExchange(const std::vector<Message>& sends,
                                                         const std::vector<Message>& recvs) = 0;
};

}  // namespace memento
