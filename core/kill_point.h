// Kill points for crash tests (RocksDB-style): MEMENTO_KILL_POINT="name[:rank=R][:step=S]" makes
// the process SIGKILL itself when it reaches point `name` (on rank R, at step S). With
// `:once=PATH` only the first process to reach it (the one that creates PATH) is killed, so a
// restarted process with the same environment survives. With `:stop=1` the process SIGSTOPs itself
// instead: it freezes there, like a process hung in the middle of a round, until a test kills it.
// Unset, a kill point costs one branch on a cached flag.
#pragma once

#include <cstdint>

namespace memento {

void KillPoint(const char* name, int rank, int64_t step);

}  // namespace memento
