// What memento-run records of each failure and recovery, printed at the end and written as JSON.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace memento::launcher {

// One failure and the recovery after it. Times are seconds since memento-run started; durations
// are seconds; -1 where the run did not get that far (or the training program sends no heartbeats).
struct Failure {
  int attempt = 0;             // the attempt that failed (0 = the first launch)
  std::string kind;            // node-loss, rank-crash, hang, agent-crash (drills or detected), rank-exit, agent-exit
  std::string detail;          // the drill's spec and how it was detected, or what exited how
  bool injected = false;       // a --inject drill
  double happened_s = -1;      // when the drill fired; for other failures, when it was detected
  double detected_s = -1;
  int64_t last_step = -1;      // the newest step any rank had reached (Snapshot(step)) before
  double stop_s = -1;          // stopping both jobs
  std::vector<int> lost_nodes;    // node ids
  std::vector<int> replacements;  // the spare that took each lost node's place
  // The recovery (the next attempt):
  double agent_restart_s = -1;  // agents launched until every one serves
  double registration_s = -1;   // training launched until every rank registered its slots
  double rebuild_s = -1;        // registered until the epoch opened (agreement, parity rebuilds, storage loads)
  double restore_s = -1;        // epoch open until every rank restored
  double resumed_after_s = -1;  // from the failure until every rank finished its first step after the restore
  int64_t restored_step = -2;   // -1: nothing was found to restore
  std::string source;           // "memory" or the checkpoint directory
  int64_t steps_lost = -1;      // last_step - restored_step

  double detection_latency_s() const { return detected_s >= 0 && happened_s >= 0 ? detected_s - happened_s : -1; }
};

struct Timeline {
  std::string job;
  std::vector<Failure> failures;
  int restarts = 0;
  int exit_code = 0;
  std::string outcome;          // one line: how the run ended
  double total_s = 0;
};

// Human-readable, several lines, each ending in '\n'.
std::string FormatTimeline(const Timeline& t);
std::string TimelineJson(const Timeline& t);

}  // namespace memento::launcher
