// libFuzzer target: heartbeat datagrams (core/heartbeat.h ParseBeat), which memento-run takes from
// any sender on the network. Invariants: an accepted beat has a known phase, a rank >= 0 and a job
// without spaces, and formatting it parses back to the same beat.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/heartbeat.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

bool Same(const memento::Beat& a, const memento::Beat& b) {
  return a.job == b.job && a.rank == b.rank && a.pid == b.pid && a.phase == b.phase && a.step == b.step &&
         a.detail == b.detail;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(memento::fuzz::Bytes(data, size));
  memento::Result<memento::Beat> beat = memento::ParseBeat(text);
  if (!beat.ok()) return 0;
  MEMENTO_FUZZ_CHECK(beat->rank >= 0, "negative rank accepted");
  MEMENTO_FUZZ_CHECK(!beat->job.empty() && beat->job.find(' ') == std::string::npos, "job '" + beat->job + "'");
  MEMENTO_FUZZ_CHECK(std::string(memento::BeatPhaseName(beat->phase)) != "?", "unknown phase accepted");
  const std::string again = memento::FormatBeat(*beat);
  memento::Result<memento::Beat> back = memento::ParseBeat(again);
  MEMENTO_FUZZ_CHECK(back.ok(), "a formatted beat does not parse: '" + again + "': " + back.status().ToString());
  MEMENTO_FUZZ_CHECK(Same(*beat, *back), "a beat changes in a format/parse round trip: '" + again + "'");
  return 0;
}
