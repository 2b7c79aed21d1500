// Without CUDA in the build there is no NCCL: the agents only choose in-memory resharding for
// ranks with CUDA tensors, which such a build cannot register.
#include "snapshot/memory_reshard.h"

namespace memento {

Status RunMemoryReshard(const proto::MemoryReshard&, const MemoryReshardIo&, MemoryReshardStats*) {
  return NotSupported("in-memory resharding needs CUDA and NCCL; this build of memento has no CUDA");
}

}  // namespace memento
