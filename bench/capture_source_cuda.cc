// The CUDA capture source: one device buffer split into tensors, and the limit copy, D2H on one
// stream into cudaMallocHost (pinned) memory. cudaError_t becomes Status here and nowhere else
// in the benchmark.
#include <cuda_runtime_api.h>

#include <memory>

#include "bench/capture_source.h"
#include "bench/harness.h"

namespace memento::bench {
namespace {

Status FromCuda(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return Status::Ok();
  std::string msg = what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  if (e == cudaErrorMemoryAllocation) return ResourceExhausted(msg);
  return Internal(msg);
}

#define MEMENTO_BENCH_CUDA(call, what) MEMENTO_RETURN_IF_ERROR(FromCuda((call), (what)))

class CudaSource : public CaptureSource {
 public:
  explicit CudaSource(int device) : device_(device) {}
  ~CudaSource() override {
    cudaSetDevice(device_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (device_buffer_ != nullptr) cudaFree(device_buffer_);
  }

  Status Init(uint64_t bytes, int tensors) {
    const std::string gpu = "GPU " + std::to_string(device_);
    MEMENTO_BENCH_CUDA(cudaSetDevice(device_), "cudaSetDevice(" + std::to_string(device_) + ")");
    MEMENTO_BENCH_CUDA(cudaMalloc(&device_buffer_, bytes), "cudaMalloc of " + std::to_string(bytes) + " bytes on " + gpu);
    MEMENTO_BENCH_CUDA(cudaMemset(device_buffer_, 0x5A, bytes), "cudaMemset of the device buffer");
    MEMENTO_BENCH_CUDA(cudaMallocHost(&pinned_, bytes), "cudaMallocHost of " + std::to_string(bytes) + " bytes");
    MEMENTO_BENCH_CUDA(cudaMemset(pinned_, 0, bytes), "cudaMemset of the pinned destination");
    MEMENTO_BENCH_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    MEMENTO_BENCH_CUDA(cudaDeviceSynchronize(), "cudaDeviceSynchronize after filling the buffers");
    size_t offset = 0;
    int i = 0;
    for (size_t n : SplitEqually(bytes, tensors)) {
      tensors_.push_back({"t" + std::to_string(i++), static_cast<uint8_t*>(device_buffer_) + offset, n});
      offset += n;
    }
    return Status::Ok();
  }

  const std::vector<SourceTensor>& tensors() const override { return tensors_; }
  MemoryKind memory_kind() const override { return MemoryKind::kCuda; }
  int cuda_device() const override { return device_; }
  std::string path() const override { return "cuda"; }
  std::string limit_name() const override { return "pinned cudaMemcpyAsync D2H"; }
  double goal_ratio() const override { return 0.9; }

  Result<double> TimeLimitCopy() override {
    MEMENTO_BENCH_CUDA(cudaSetDevice(device_), "cudaSetDevice");
    const auto t0 = Clock::now();
    size_t offset = 0;
    for (const SourceTensor& t : tensors_) {
      MEMENTO_BENCH_CUDA(cudaMemcpyAsync(static_cast<uint8_t*>(pinned_) + offset, t.data, t.bytes,
                                         cudaMemcpyDeviceToHost, stream_),
                         "cudaMemcpyAsync D2H of tensor '" + t.name + "'");
      offset += t.bytes;
    }
    MEMENTO_BENCH_CUDA(cudaStreamSynchronize(stream_), "cudaStreamSynchronize after the limit copy");
    return Seconds(t0, Clock::now());
  }

 private:
  int device_;
  void* device_buffer_ = nullptr;
  void* pinned_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::vector<SourceTensor> tensors_;
};

}  // namespace

bool BuiltWithCuda() { return true; }

Result<std::unique_ptr<CaptureSource>> MakeCudaSource(uint64_t bytes, int tensors, int device) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    return NotSupported(std::string("no CUDA device (") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e) + ")");
  }
  if (count == 0) return NotSupported("no CUDA device (cudaGetDeviceCount found none)");
  if (device < 0 || device >= count) {
    return InvalidArgument("--device " + std::to_string(device) + " but this machine has " + std::to_string(count) +
                           " CUDA device(s)");
  }
  auto source = std::make_unique<CudaSource>(device);
  MEMENTO_RETURN_IF_ERROR(source->Init(bytes, tensors));
  return std::unique_ptr<CaptureSource>(std::move(source));
}

}  // namespace memento::bench
