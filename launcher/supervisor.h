// The supervisor behind memento-run: starts the agents' job and the training job, watches them
// (process exits, heartbeats, drills), and on a failure stops both, replaces lost nodes with
// spares and starts again, until training ends or restarts run out.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/env.h"
#include "core/heartbeat.h"
#include "launcher/commands.h"
#include "launcher/options.h"
#include "launcher/timeline.h"

namespace memento::launcher {

class Supervisor {
 public:
  // `agent_bin`: memento-agent's path.
  Supervisor(Options options, std::string agent_bin);
  // Runs to the end; returns the exit status memento-run exits with. Prints progress to stderr
  // (unless --quiet) and the timeline to stdout.
  int Run();
  const Timeline& timeline() const { return timeline_; }

 private:
  using Clock = std::chrono::steady_clock;

  // What a rank's heartbeats told, in the current attempt.
  struct RankSeen {
    int64_t pid = 0;
    BeatPhase phase = BeatPhase::kConnected;
    Clock::time_point last_beat;
    int64_t step = -1;                 // newest Snapshot step
    // Since when the rank's snapshot of `waiting_step` waits for its agent (kWaiting beats with a
    // step: a capture waiting for a free slot); waiting_step -1 when it does not.
    int64_t waiting_step = -1;
    Clock::time_point waiting_since;
    double registered_s = -1, ready_s = -1, restored_s = -1, resumed_s = -1;
    int64_t restored_step = -2;
    std::string source;
  };
  struct Attempt {
    int index = 0;
    NodePlan plan;
    pid_t agents = -1;                // the agents' mpirun/srun
    pid_t training = -1;              // the training's mpirun/srun
    double agents_launched_s = -1, agents_up_s = -1, training_launched_s = -1;
    std::map<int, RankSeen> ranks;
    std::map<int, int64_t> agent_pids;  // node id -> pid (from the pid files)
    std::vector<int64_t> stopped;       // pids under SIGSTOP (hang drills)
    std::vector<int> killed_nodes;      // node ids lost in this attempt (drills)
  };
  enum class End { kSuccess, kFailure, kFatal };

  Status Prepare();
  End RunAttempt(Attempt* a, Failure* recovering, Failure* failed);
  pid_t Launch(const Command& c, const std::string& log_path);
  bool WaitAgentsUp(Attempt* a, Failure* failed);
  void HandleBeat(Attempt* a, const Beat& b, Failure* recovering, Failure* pending);
  void Fire(Attempt* a, Injection* in, Failure* pending);
  void KillNode(Attempt* a, int node_id);
  void StopAll(Attempt* a, bool graceful);
  std::vector<int> FindLostNodes(const Attempt& a);
  int NodeOfRank(const Attempt& a, int rank) const;
  double Now() const;
  void Say(const std::string& line) const;
  int Finish(int code, const std::string& outcome);

  Options o_;
  std::string agent_bin_;
  std::string token_;
  bool srun_ = false;
  Clock::time_point start_;
  std::unique_ptr<HeartbeatReceiver> beats_;
  std::string heartbeat_host_;  // where ranks send beats (this host)
  NodePlan plan_;
  std::vector<int> spare_ids_;
  std::vector<std::string> spare_hosts_;
  std::vector<std::string> all_hosts_;  // hostfile order; node id = index
  Timeline timeline_;
  std::vector<bool> fired_;  // per --inject: fired already
  Failure* recovering_ = nullptr;  // the failure the current attempt recovers from
};

}  // namespace memento::launcher
