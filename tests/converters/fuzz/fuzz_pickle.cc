// libFuzzer target: the pickle machine (converters/torch_pickle.h) on arbitrary bytes, in both
// modes. It must return a value or an error, never crash, hang or run anything.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "converters/torch_pickle.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  memento::PickleLimits limits;
  memento::Result<memento::PickleValuePtr> v = memento::Unpickle(bytes, limits);
  if (v.ok()) {
    // The writer must refuse or write what the machine built.
    (void)memento::PickleForTorch(**v);
  }
  limits.strict_globals = true;
  (void)memento::Unpickle(bytes, limits);
  return 0;
}
