// The CUDA capture source of a build without CUDA (MEMENTO_WITH_CUDA=OFF): always NotSupported.
#include "bench/capture_source.h"

namespace memento::bench {

bool BuiltWithCuda() { return false; }

Result<std::unique_ptr<CaptureSource>> MakeCudaSource(uint64_t, int, int) {
  return NotSupported("this memento-bench was built without CUDA (MEMENTO_WITH_CUDA=OFF); reconfigure with "
                      "-DMEMENTO_WITH_CUDA=ON on a machine with the CUDA toolkit");
}

}  // namespace memento::bench
