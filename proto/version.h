// Versions that peers and files check: the library, the agent protocol and the catalog format.
#pragma once

#include <cstdint>

namespace memento {

inline constexpr const char* kLibraryVersion = "0.1.0";
// Bumped on any incompatible change of the client <-> agent messages.
inline constexpr uint32_t kAgentProtocolVersion = 2;  // 2: in-memory resharding (NcclId, MemoryReshard)
// Bumped on any incompatible change of the catalog records.
inline constexpr uint32_t kCatalogFormatVersion = 1;

// The end of the agent's answer to a restore when nothing of the job was ever saved; memento-run
// then starts the training over after a failure instead of stopping (nothing saved is lost).
inline constexpr const char* kNothingSaved =
    "nothing of this job was saved yet (no version was ever complete on every node, no checkpoint committed)";

}  // namespace memento
