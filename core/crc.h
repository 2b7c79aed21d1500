// CRC-64 (ECMA-182, reflected, as ISA-L's crc64_ecma_refl) over byte ranges.
// Thread-safe: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>

namespace memento {

// CRC of `len` bytes at `data`, continuing from `seed` (0 for a fresh CRC).
uint64_t Crc64(const void* data, size_t len, uint64_t seed = 0);

}  // namespace memento
