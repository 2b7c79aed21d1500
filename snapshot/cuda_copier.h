// The CUDA capture path: pins slot memory with cudaHostRegister (once, in parallel chunks) and
// copies device buffers into it on a dedicated non-blocking stream ordered after the training
// stream by an event, so the training stream is never synchronised. Without CUDA in the build
// every call answers NotSupported. One CudaCopier per device; used by one thread at a time.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "core/status.h"

namespace memento {

class CudaCopier {
 public:
  // OK when this build has CUDA and a device is present; otherwise says why not.
  static Status Available();
  static Result<std::unique_ptr<CudaCopier>> Create(int device);
  virtual ~CudaCopier() = default;

  // Pins [p, p + bytes) for DMA, in chunks of `chunk` bytes registered by `threads` threads.
  virtual Status RegisterHost(void* p, size_t bytes, size_t chunk, int threads) = 0;
  virtual void UnregisterHost(void* p, size_t bytes, size_t chunk) = 0;
  // Records an event on `stream` (nullptr = the legacy default stream) that the next copies wait for:
  // the state as of everything the training stream enqueued so far.
  virtual Status RecordProducer(void* stream) = 0;
  // Enqueues a device-to-host copy on the copy stream.
  virtual Status EnqueueD2H(void* host_dst, const void* device_src, size_t bytes) = 0;
  // Blocks the calling thread (not the training stream) until enqueued copies are done.
  virtual Status Synchronize() = 0;
  // Enqueues a host-to-device copy (restore) on the copy stream; Synchronize() waits for it.
  virtual Status EnqueueH2D(void* device_dst, const void* host_src, size_t bytes) = 0;
};

}  // namespace memento
