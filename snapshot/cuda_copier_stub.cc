// CUDA path when the build has no CUDA: every call answers NotSupported.
#include "snapshot/cuda_copier.h"

namespace memento {

Status CudaCopier::Available() { return NotSupported("this build of memento has no CUDA support (MEMENTO_WITH_CUDA=OFF)"); }

Result<std::unique_ptr<CudaCopier>> CudaCopier::Create(int) { return Available(); }

}  // namespace memento
