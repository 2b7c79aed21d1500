// memento-run's options: parsed from the command line, checked, with their defaults.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/status.h"

namespace memento::launcher {

// A drill: a failure memento-run causes itself, once, when a rank reaches `step`.
struct Injection {
  enum class Kind { kNodeLoss, kRankCrash, kHang, kAgentCrash };
  Kind kind = Kind::kRankCrash;
  int target = 0;              // node id (node-loss, agent-crash) or rank (rank-crash, hang)
  int64_t step = 0;            // fires when a rank of the target reaches this step (Snapshot(step))
  bool during_recovery = false;  // "during=recovery": fires in the next recovery instead, once the
                                 // restarted ranks have registered (step is then ignored)
  std::string spec;            // as given, for messages
};
const char* InjectionKindName(Injection::Kind k);
// node-loss and agent-crash target a node; rank-crash and hang a rank.
inline bool TargetsNode(const Injection& in) {
  return in.kind == Injection::Kind::kNodeLoss || in.kind == Injection::Kind::kAgentCrash;
}
// "node-loss:node=I:step=S", "rank-crash:rank=R:step=S", "hang:rank=R:step=S",
// "agent-crash:node=I:step=S"; "node-loss:node=I:during=recovery" also. InvalidArgument naming the
// part at fault.
Result<Injection> ParseInjection(const std::string& spec);

// The step drills (not during=recovery) that a rank's Snapshot(step) heartbeat fires, in order:
// the unfired drills whose target sent it (the rank, or the node `node` it runs on) and whose step
// it reached; and with each, every unfired drill of the same step, whatever its target has reached:
// drills of one step are one failure. A rank drill's target must be signallable
// (`rank_known(rank)`) to fire with another; else it waits for its own heartbeat.
std::vector<size_t> StepDrillsFired(const std::vector<Injection>& drills, const std::vector<bool>& fired, int rank,
                                    int node, int64_t step, const std::function<bool(int)>& rank_known);

enum class Launcher { kAuto, kMpirun, kSrun };

struct Options {
  // Where the nodes come from: exactly one of these.
  std::string hostfile;        // --hostfile F: one host per line ("host" or "host slots=N"), spares last
  int simulate_nodes = 0;      // --simulate-nodes N: N simulated nodes on this machine
  int ranks_per_node = 1;      // --ranks-per-node R
  int spares = 0;              // --spares S: nodes kept idle to replace lost ones
  std::string ec = "none";     // --ec none|replicate:R|xor|rs:M
  int group_size = 0;          // --group-size N (0 = all nodes in one group)
  std::string storage;         // --storage DIR
  int flush_every = 0;         // --flush-every K (0 = any version)
  std::string restore_from;    // --restore-from DIR: a universal or native checkpoint to resume from
  int max_restarts = 3;        // --max-restarts K
  double hang_timeout_s = 300;  // --hang-timeout SECONDS (0 = off)
  double stop_grace_s = 5;     // --stop-grace SECONDS: SIGTERM, then SIGKILL after this
  double start_timeout_s = 60;  // --start-timeout SECONDS: agents must serve within this
  std::vector<Injection> injections;  // --inject SPEC, repeatable
  std::string job;             // --job ID (default run-<time>-<pid>)
  std::string work_dir;        // --work-dir DIR (default /tmp/memento-run-<job>)
  std::string timeline;        // --timeline FILE (default <work-dir>/timeline.json)
  Launcher launcher = Launcher::kAuto;  // --launcher auto|mpirun|srun (auto: srun under Slurm)
  std::vector<std::string> agent_args;  // --agent-arg X, repeatable: passed to memento-agent
  std::vector<std::string> mpirun_args;  // --mpirun-arg X, repeatable: passed to the launch command
  std::string agent_bin;       // --agent-bin PATH (default: memento-agent next to memento-run)
  bool quiet = false;          // --quiet: only the summary
  std::vector<std::string> command;  // after "--": the training program and its arguments
  bool help = false;
};

// Parses argv (argv[0] is the program). InvalidArgument with a message that names the flag.
Result<Options> ParseOptions(int argc, const char* const* argv);
extern const char* const kUsage;

}  // namespace memento::launcher
