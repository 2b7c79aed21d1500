// Without CUDA in the build there is no NCCL: the agents only choose in-memory resharding for
// ranks with CUDA tensors, which such a build cannot register.
#include "snapshot/memory_reshard.h"

namespace memento {

std::shared_ptr<MemoryReshardPrep> StartMemoryReshardPrep(int, std::function<void()> done) {
  if (done) done();
  return nullptr;
}

Status RunMemoryReshard(const proto::MemoryReshard&, const MemoryReshardIo&, MemoryReshardStats*) {
  return NotSupported("in-memory resharding needs CUDA and NCCL; this build of memento has no CUDA");
}

}  // namespace memento
