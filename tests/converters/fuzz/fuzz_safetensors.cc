// libFuzzer target: the safetensors reader (ucp_format/safetensors.h) on arbitrary bytes, then
// every tensor read. Inputs go through a file in /dev/shm.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "ucp_format/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/dev/shm/memento-fuzz-st-" + std::to_string(::getpid());
  FILE* out = std::fopen(path.c_str(), "wb");
  if (out == nullptr) return 0;
  std::fwrite(data, 1, size, out);
  std::fclose(out);
  memento::Result<std::unique_ptr<memento::SafetensorsFile>> f = memento::SafetensorsFile::Open(memento::PosixFileSystem(), path);
  if (f.ok()) {
    for (const memento::SafetensorsEntry& e : (*f)->entries()) {
      if (e.end - e.begin < (uint64_t{64} << 20)) (void)(*f)->Read(e.key);
    }
  }
  return 0;
}
