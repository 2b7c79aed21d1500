// CUDA path with the runtime API; cudaError_t converted to Status here and nowhere else.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <thread>
#include <vector>

#include "snapshot/cuda_copier.h"

namespace memento {
namespace {

Status FromCuda(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return Status::Ok();
  std::string msg = what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) return NotSupported(msg);
  if (e == cudaErrorMemoryAllocation) return ResourceExhausted(msg);
  return Internal(msg);
}

#define MEMENTO_CUDA(call, what) MEMENTO_RETURN_IF_ERROR(FromCuda((call), (what)))

class CudaCopierImpl : public CudaCopier {
 public:
  explicit CudaCopierImpl(int device) : device_(device) {}
  ~CudaCopierImpl() override {
    cudaSetDevice(device_);
    if (event_) cudaEventDestroy(event_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  Status Init() {
    MEMENTO_CUDA(cudaSetDevice(device_), "cudaSetDevice(" + std::to_string(device_) + ")");
    MEMENTO_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    MEMENTO_CUDA(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    return Status::Ok();
  }

  Status RegisterHost(void* p, size_t bytes, size_t chunk, int threads) override {
    std::vector<std::pair<char*, size_t>> pieces;
    for (size_t off = 0; off < bytes; off += chunk) {
      pieces.emplace_back(static_cast<char*>(p) + off, std::min(chunk, bytes - off));
    }
    std::vector<cudaError_t> errs(pieces.size(), cudaSuccess);
    std::vector<std::thread> ts;
    const int n = std::max(1, std::min<int>(threads, static_cast<int>(pieces.size())));
    for (int t = 0; t < n; ++t) {
      ts.emplace_back([&, t] {
        cudaSetDevice(device_);
        for (size_t i = t; i < pieces.size(); i += n) {
          errs[i] = cudaHostRegister(pieces[i].first, pieces[i].second, cudaHostRegisterPortable);
        }
      });
    }
    for (auto& th : ts) th.join();
    for (size_t i = 0; i < errs.size(); ++i) {
      MEMENTO_CUDA(errs[i], "cudaHostRegister of " + std::to_string(pieces[i].second) + " bytes of a slot");
    }
    return Status::Ok();
  }

  void UnregisterHost(void* p, size_t bytes, size_t chunk) override {
    for (size_t off = 0; off < bytes; off += chunk) cudaHostUnregister(static_cast<char*>(p) + off);
  }

  Status RecordProducer(void* stream) override {
    MEMENTO_CUDA(cudaSetDevice(device_), "cudaSetDevice");
    MEMENTO_CUDA(cudaEventRecord(event_, static_cast<cudaStream_t>(stream)), "cudaEventRecord on the training stream");
    MEMENTO_CUDA(cudaStreamWaitEvent(stream_, event_, 0), "cudaStreamWaitEvent");
    return Status::Ok();
  }

  Status EnqueueD2H(void* host_dst, const void* device_src, size_t bytes) override {
    MEMENTO_CUDA(cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost, stream_),
                 "cudaMemcpyAsync D2H of " + std::to_string(bytes) + " bytes");
    return Status::Ok();
  }

  Status Synchronize() override {
    MEMENTO_CUDA(cudaStreamSynchronize(stream_), "cudaStreamSynchronize(copy stream)");
    return Status::Ok();
  }

  Status EnqueueH2D(void* device_dst, const void* host_src, size_t bytes) override {
    MEMENTO_CUDA(cudaSetDevice(device_), "cudaSetDevice");
    MEMENTO_CUDA(cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpyAsync H2D of " + std::to_string(bytes) + " bytes");
    return Status::Ok();
  }

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t event_ = nullptr;
};

}  // namespace

Status CudaCopier::Available() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return NotSupported(std::string("no usable CUDA device: ") + cudaGetErrorString(e));
  if (n == 0) return NotSupported("no CUDA device present");
  return Status::Ok();
}

Result<std::unique_ptr<CudaCopier>> CudaCopier::Create(int device) {
  MEMENTO_RETURN_IF_ERROR(Available());
  auto c = std::make_unique<CudaCopierImpl>(device);
  MEMENTO_RETURN_IF_ERROR(c->Init());
  return std::unique_ptr<CudaCopier>(std::move(c));
}

}  // namespace memento
