// The host capture source: pre-faulted host tensors and the multi-threaded memcpy limit.
#include <memory>

#include "bench/capture_source.h"
#include "bench/harness.h"
#include "core/thread_pool.h"

namespace memento::bench {

std::vector<size_t> SplitEqually(uint64_t bytes, int tensors) {
  std::vector<size_t> sizes(static_cast<size_t>(tensors), static_cast<size_t>(bytes / tensors));
  sizes.back() += static_cast<size_t>(bytes % tensors);
  return sizes;
}

namespace {

class HostSource : public CaptureSource {
 public:
  HostSource(int threads, size_t chunk_bytes) : pool_(threads), chunk_bytes_(chunk_bytes) {}

  Status Init(uint64_t bytes, int tensors) {
    MEMENTO_ASSIGN_OR_RETURN(destination_, HostBuffer::Create(bytes, 0xA5));
    size_t offset = 0;
    int i = 0;
    for (size_t n : SplitEqually(bytes, tensors)) {
      MEMENTO_ASSIGN_OR_RETURN(auto buf, HostBuffer::Create(n, static_cast<uint8_t>(i)));
      tensors_.push_back({"t" + std::to_string(i), buf->data(), n});
      regions_.push_back({destination_->data() + offset, buf->data(), n});
      buffers_.push_back(std::move(buf));
      offset += n;
      ++i;
    }
    return Status::Ok();
  }

  const std::vector<SourceTensor>& tensors() const override { return tensors_; }
  MemoryKind memory_kind() const override { return MemoryKind::kHost; }
  int cuda_device() const override { return 0; }
  std::string path() const override { return "host"; }
  std::string limit_name() const override { return "memcpy"; }
  double goal_ratio() const override { return 0.8; }

  Result<double> TimeLimitCopy() override { return ParallelMemcpy(&pool_, regions_, chunk_bytes_); }

 private:
  ThreadPool pool_;
  size_t chunk_bytes_;
  std::vector<std::unique_ptr<HostBuffer>> buffers_;
  std::unique_ptr<HostBuffer> destination_;
  std::vector<SourceTensor> tensors_;
  std::vector<CopyRegion> regions_;
};

}  // namespace

Result<std::unique_ptr<CaptureSource>> MakeHostSource(uint64_t bytes, int tensors, int threads, size_t chunk_bytes) {
  auto source = std::make_unique<HostSource>(threads, chunk_bytes);
  MEMENTO_RETURN_IF_ERROR(source->Init(bytes, tensors));
  return std::unique_ptr<CaptureSource>(std::move(source));
}

}  // namespace memento::bench
