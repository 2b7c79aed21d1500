// CRC-64 through ISA-L: the error-free, vectorised implementation every agent uses.
#include "core/crc.h"

#include <isa-l/crc64.h>

namespace memento {

uint64_t Crc64(const void* data, size_t len, uint64_t seed) {
  return crc64_ecma_refl(seed, static_cast<const unsigned char*>(data), len);
}

}  // namespace memento
