// The state a capture benchmark snapshots, and the plain copy that bounds the capture's speed
// (its limit, DESIGN.md §9): host buffers and a multi-threaded memcpy, or a CUDA device buffer and
// a D2H copy into pinned memory. Used by one thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "snapshot/client.h"

namespace memento::bench {

struct SourceTensor {
  std::string name;
  void* data = nullptr;  // host pointer, or device pointer on device()
  size_t bytes = 0;
};

class CaptureSource {
 public:
  virtual ~CaptureSource() = default;

  virtual const std::vector<SourceTensor>& tensors() const = 0;
  virtual MemoryKind memory_kind() const = 0;
  virtual int cuda_device() const = 0;

  // "host" or "cuda" (the JSON "path"), the limit's name (the JSON "limit") and the goal for
  // capture bandwidth as a fraction of the limit's.
  virtual std::string path() const = 0;
  virtual std::string limit_name() const = 0;
  virtual double goal_ratio() const = 0;

  // Copies every tensor once the plain way (the limit) and returns the seconds it took, from the
  // first copy issued to the last byte landed.
  virtual Result<double> TimeLimitCopy() = 0;
};

// Host buffers of `bytes` in total, split into `tensors` tensors of equal size (the last takes the
// remainder); the limit is ParallelMemcpy with `threads` threads and `chunk_bytes` tasks, from the
// same buffers into a separate, pre-faulted destination of the same size.
Result<std::unique_ptr<CaptureSource>> MakeHostSource(uint64_t bytes, int tensors, int threads, size_t chunk_bytes);

// True when this memento-bench was built with MEMENTO_WITH_CUDA.
bool BuiltWithCuda();

// One cudaMalloc of `bytes` on `device`, split into `tensors` tensors; the limit is
// cudaMemcpyAsync D2H of every tensor on one stream into cudaMallocHost memory, then
// cudaStreamSynchronize. NotSupported without CUDA in the build or without a device.
Result<std::unique_ptr<CaptureSource>> MakeCudaSource(uint64_t bytes, int tensors, int device);

// The sizes of `tensors` equal parts of `bytes` (the last takes the remainder).
std::vector<size_t> SplitEqually(uint64_t bytes, int tensors);

}  // namespace memento::bench
