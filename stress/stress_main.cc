// memento-stress: crash-stress for memento-run (issue #8). Each round runs memento-train-example
// under memento-run on simulated nodes with faults whose kinds and moments come from the round's
// seed, then checks the outcome against what a failure-free run computes.
//
// Round i of `--seed S` uses seed S + i, so `--seed S+i --rounds 1` (same other flags) replays it.
// `--jobs N` runs N rounds at once (each its own job, directory and processes); a round's outcome
// does not depend on which others run beside it, only on how loaded the machine is.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <atomic>
#include <chrono>
#include <map>
#include <set>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "proto/version.h"

namespace memento::stress {
namespace {

// Plain options; each field names its flag and default.
struct Options {
  int rounds = 10;              // --rounds
  uint64_t seed = 1;            // --seed: round i uses seed + i
  int nodes = 4;                // --nodes: simulated nodes
  int ranks_per_node = 2;       // --ranks-per-node
  std::string ec = "rs:2";      // --ec: none | xor | replicate:R | rs:M
  int steps = 20;               // --steps of memento-train-example
  int step_ms = 40;             // --step-ms of memento-train-example
  int hang_timeout_s = 3;       // --hang-timeout passed to memento-run (seconds)
  std::string work_dir;         // --work-dir (default /tmp/memento-stress-<pid>)
  std::string bin_dir;          // --bin-dir (default: the directory of this executable)
  int jobs = 1;                 // --jobs: rounds run at once
  bool keep_going = true;       // --stop-on-failure turns it off
  bool verbose = false;         // --verbose: print each round's plan and result
  bool dry_run = false;         // --dry-run: print each round's plan and the counts; run nothing
  bool corrupt_reference = false;  // --corrupt-reference (hidden; tests): proves the checker fails
  bool drop_intents = false;       // --drop-intents (hidden; tests): proves the upper bound after losses fails
};

// SplitMix64: the same sequence on every platform (std:: distributions are not specified).
struct Rng {
  uint64_t s;
  uint64_t Next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // A value in [lo, hi]; callers ensure lo <= hi.
  int Uniform(int lo, int hi) { return lo + static_cast<int>(Next() % static_cast<uint64_t>(hi - lo + 1)); }
};

// How many simultaneous node losses per group the scheme survives.
int Tolerance(const std::string& ec) {
  if (ec == "none") return 0;
  if (ec == "xor") return 1;
  if (ec.rfind("rs:", 0) == 0) return std::atoi(ec.c_str() + 3);
  if (ec.rfind("replicate:", 0) == 0) return std::atoi(ec.c_str() + 10) - 1;
  return -1;
}

// One planned fault. `drills` are memento-run --inject specs (none for the flusher kill).
struct Fault {
  std::string kind;   // counted kind: rank-crash, hang, agent-crash, node-loss, node-loss-x2,
                      // node-loss-during-recovery, flusher-kill, storage-full, storage-eio,
                      // memory-loss (more nodes at once than the scheme tolerates)
  std::vector<std::string> drills;
  int node = -1;      // flusher-kill: the node whose flusher dies mid-write
  std::string fs_spec;  // storage-full, storage-eio: every agent's --inject-fs
};

struct Plan {
  uint64_t seed = 0;
  int flush_every = 0;
  std::vector<Fault> faults;
  int expected_failures = 0;   // injected timeline entries (drills of one step are one entry)
  int spares = 0;
};

// Node losses are drawn at this step or later.
constexpr int kFirstLossStep = 8;

// Draws 1..3 faults at distinct steps. Node losses never exceed the scheme's tolerance at one
// moment; each takes a spare. Drills name original node ids (memento-run accepts only those), so
// node-targeted faults aim at nodes never lost before; the flusher-kill node is never lost.
Plan Draw(const Options& o, uint64_t seed) {
  Plan p;
  p.seed = seed;
  Rng rng{seed};
  const int m = Tolerance(o.ec);
  const int world = o.nodes * o.ranks_per_node;
  p.flush_every = rng.Uniform(3, 6);
  std::vector<int> intact;  // original node ids never lost, minus the flusher-kill node
  for (int i = 0; i < o.nodes; ++i) intact.push_back(i);
  std::vector<int> crashable = intact;  // never lost (agent-crash targets)
  const int count = rng.Uniform(1, 3);
  std::vector<int> steps;
  while (static_cast<int>(steps.size()) < count) {
    const int s = rng.Uniform(4, o.steps - 2);
    bool clash = false;
    for (int t : steps) clash = clash || (s > t - 2 && s < t + 2);
    if (!clash) steps.push_back(s);
  }
  std::sort(steps.begin(), steps.end());
  bool flusher_used = false;
  // Removes a random node from `intact` (and from `crashable`); returns its id.
  auto take = [&]() {
    const int pos = rng.Uniform(0, static_cast<int>(intact.size()) - 1);
    const int id = intact[static_cast<size_t>(pos)];
    intact.erase(intact.begin() + pos);
    crashable.erase(std::find(crashable.begin(), crashable.end(), id));
    return id;
  };
  for (size_t i = 0; i < steps.size(); ++i) {
    const std::string at = ":step=" + std::to_string(steps[i]);
    const int left = static_cast<int>(intact.size());
    Fault f;
    int k = rng.Uniform(0, 6);
    if (k == 6 && (flusher_used || left < 1)) k = 0;
    // The flusher dies at the first flush (step --flush-every, before kFirstLossStep); a node loss
    // "during recovery" would then fire in that early recovery, before anything is protected.
    if (k == 6 && !p.faults.empty() && p.faults[0].kind == "node-loss-during-recovery") k = 0;
    // Before the first protected (encoded) version a node loss is unrecoverable by design
    // (LauncherE2E.NothingRecoverable); encoding lags a few steps behind, more under load.
    if (k >= 3 && k <= 5 && steps[i] < kFirstLossStep) k -= 3;
    if (k == 5 && i != 0) k = 3;  // during=recovery fires in the first recovery, whoever caused it
    if (k == 4 && (m < 2 || left < 2)) k = 3;
    if ((k == 3 || k == 5) && (m < 1 || left < 1)) k = 2;
    if (k == 2 && crashable.empty()) k = 0;
    switch (k) {
      case 0: f.kind = "rank-crash"; f.drills = {"rank-crash:rank=" + std::to_string(rng.Uniform(0, world - 1)) + at}; break;
      case 1: f.kind = "hang"; f.drills = {"hang:rank=" + std::to_string(rng.Uniform(0, world - 1)) + at}; break;
      case 2: {
        const int id = crashable[static_cast<size_t>(rng.Uniform(0, static_cast<int>(crashable.size()) - 1))];
        f.kind = "agent-crash";
        f.drills = {"agent-crash:node=" + std::to_string(id) + at};
        break;
      }
      case 3: f.kind = "node-loss"; f.drills = {"node-loss:node=" + std::to_string(take()) + at}; break;
      case 4: {
        // Both drills fire together, as one failure, when a rank of either node reaches the step.
        f.kind = "node-loss-x2";
        const int a = take();
        f.drills = {"node-loss:node=" + std::to_string(a) + at, "node-loss:node=" + std::to_string(take()) + at};
        ++p.spares;
        break;
      }
      case 5:
        // A rank crash, then a node lost while the job recovers from it.
        f.kind = "node-loss-during-recovery";
        f.drills = {"rank-crash:rank=" + std::to_string(rng.Uniform(0, world - 1)) + at,
                    "node-loss:node=" + std::to_string(take()) + ":during=recovery"};
        ++p.expected_failures;
        break;
      default: {
        // This node's agent dies after writing its first rank's files of a flush; it is never lost.
        flusher_used = true;
        f.kind = "flusher-kill";
        const int pos = rng.Uniform(0, left - 1);
        f.node = intact[static_cast<size_t>(pos)];
        intact.erase(intact.begin() + pos);
        break;
      }
    }
    if (k == 3 || k == 5) ++p.spares;
    if (k == 4) ++p.spares;
    ++p.expected_failures;
    p.faults.push_back(f);
  }
  // Storage that fails for the whole round, the file system full or failing with EIO after a few
  // MiB per agent (less than one flush of a node): no flush commits, and the job goes on from
  // memory. Drawn after the faults above, so that their draws stay those of earlier versions; not
  // beside a flusher kill, which needs a flush to get half-way.
  if (!flusher_used && rng.Uniform(0, 3) == 0) {
    Fault f;
    const bool eio = rng.Uniform(0, 1) == 1;
    const uint64_t bytes = static_cast<uint64_t>(rng.Uniform(0, 4)) << 20;
    f.kind = eio ? "storage-eio" : "storage-full";
    f.fs_spec = (eio ? "eio_after=" : "enospc_after=") + std::to_string(bytes);
    p.faults.push_back(f);
  }
  // Memory lost beyond what the scheme tolerates: m + 1 nodes at once, so that no version in memory
  // can be rebuilt and the job resumes from the newest committed checkpoint (or, when none was
  // committed yet, stops: "found no version to restore"). In about a quarter of the rounds whose
  // storage works and that have nodes left, after every other fault and at least two flush
  // intervals in. Drawn last, so that the plans of earlier versions' seeds are unchanged.
  // Replication is left out: it survives some losses beyond m (non-adjacent nodes).
  const bool storage_fault = !p.faults.empty() && !p.faults.back().fs_spec.empty();
  const int after = std::max(steps.back() + 2, std::max(kFirstLossStep, 2 * p.flush_every + 2));
  if (m >= 1 && o.ec.rfind("replicate:", 0) != 0 && !storage_fault && !flusher_used &&
      static_cast<int>(intact.size()) >= m + 1 && after <= o.steps - 2 && rng.Uniform(0, 3) == 0) {
    Fault f;
    f.kind = "memory-loss";
    const std::string at = ":step=" + std::to_string(rng.Uniform(after, o.steps - 2));
    for (int i = 0; i <= m; ++i) f.drills.push_back("node-loss:node=" + std::to_string(take()) + at);
    p.spares += m + 1;
    ++p.expected_failures;
    p.faults.push_back(f);
  }
  return p;
}

std::string RunCommand(const std::string& cmd, int* exit_code) {
  std::string out;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) {
    *exit_code = -1;
    return "popen failed: " + cmd;
  }
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int st = ::pclose(p);
  *exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
  return out;
}

// The last line starting with "state_hash=" (not global_state_hash=).
std::string LastStateHash(const std::string& out) {
  size_t p = out.rfind("\nstate_hash=");
  if (p == std::string::npos) return out.rfind("state_hash=", 0) == 0 ? out.substr(0, out.find('\n')) : "";
  ++p;
  return out.substr(p, out.find('\n', p) - p);
}

// The objects of the timeline's "failures" array, as text (they hold no nested objects).
std::vector<std::string> Failures(const std::string& json) {
  std::vector<std::string> out;
  for (size_t p = json.find("{\"attempt\""); p != std::string::npos; p = json.find("{\"attempt\"", p + 1)) {
    out.push_back(json.substr(p, json.find('}', p) - p + 1));
  }
  return out;
}

// The raw value text of "key" in a flat JSON object; strings keep their quotes.
std::string Field(const std::string& obj, const std::string& key) {
  size_t p = obj.find("\"" + key + "\":");
  if (p == std::string::npos) return "<missing>";
  p += key.size() + 3;
  const size_t end = obj[p] == '[' ? obj.find(']', p) + 1
                     : obj[p] == '"' ? obj.find('"', p + 1) + 1
                                     : obj.find_first_of(",}", p);
  return obj.substr(p, end - p);
}
long Number(const std::string& obj, const std::string& key) { return std::atol(Field(obj, key).c_str()); }

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string Quoted(const std::string& s) { return "\"" + s + "\""; }

// Whether a failure's detail names `drill` among the drills that fired together
// ("A + B; detected: ...").
bool HasDrill(const std::string& failure, const std::string& drill) {
  const std::string detail = Field(failure, "detail");
  const size_t end = detail.find("; detected");
  const std::string drills = " + " + detail.substr(1, end == std::string::npos ? std::string::npos : end - 1) + " + ";
  return drills.find(" + " + drill + " + ") != std::string::npos;
}

// The agents' event log (MEMENTO_EVENT_LOG): "attempt=A node=N step=S protected|committed".
struct EventLog {
  std::map<long, std::map<long, std::set<long>>> protected_steps;  // attempt -> node -> steps
  std::map<long, std::set<long>> committed;                        // attempt -> steps
  // Logged before anything records them: supersets of the two above.
  std::map<long, std::map<long, std::set<long>>> protecting;       // attempt -> node -> steps
  std::map<long, std::set<long>> committing;                       // attempt -> steps
  std::vector<std::string> malformed;                              // "malformed event log line: ..."

  static EventLog Parse(const std::string& log) {
    EventLog out;
    std::istringstream in(log);
    for (std::string line; std::getline(in, line);) {
      long a = -1, n = -1, st = -1;
      char event[16] = {};
      const bool parsed = std::sscanf(line.c_str(), "attempt=%ld node=%ld step=%ld %15s", &a, &n, &st, event) == 4 && a >= 0;
      if (parsed && std::string(event) == "protected") {
        out.protected_steps[a][n].insert(st);
      } else if (parsed && std::string(event) == "committed") {
        out.committed[a].insert(st);
      } else if (parsed && std::string(event) == "protecting") {
        out.protecting[a][n].insert(st);
      } else if (parsed && std::string(event) == "committing") {
        out.committing[a].insert(st);
      } else {
        out.malformed.push_back("malformed event log line: " + line);
      }
    }
    return out;
  }
};

class Stress {
 public:
  explicit Stress(const Options& o) : o_(o) {}

  // The failure-free state_hash of this configuration, computed once.
  bool ComputeReference() {
    int rc = 0;
    const std::string out =
        RunCommand("mpirun --oversubscribe -np " + std::to_string(o_.nodes * o_.ranks_per_node) + " " + o_.bin_dir +
                       "/memento-train-example --no-memento --quiet " + TrainArgs(),
                   &rc);
    reference_ = LastStateHash(out);
    if (rc != 0 || reference_.empty()) {
      std::fprintf(stderr, "memento-stress: the reference run failed (exit %d):\n%s\n", rc, out.c_str());
      return false;
    }
    if (o_.corrupt_reference) reference_ += "-corrupted";
    std::printf("memento-stress: reference %s (%d ranks, %d steps, no memento)\n", reference_.c_str(),
                o_.nodes * o_.ranks_per_node, o_.steps);
    return true;
  }

  // Runs one round; returns the problems found (empty: passed). `notes` gets what is worth
  // reporting but is not wrong: failures nobody injected (a hang detected under load).
  std::vector<std::string> Round(const Plan& plan, std::vector<std::string>* notes) {
    const std::string job = "stress" + std::to_string(::getpid()) + "s" + std::to_string(plan.seed);
    const std::string dir = o_.work_dir + "/" + job;
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    // Every rank appends "attempt=A rank=R step=S" once its agent acknowledged the capture.
    // Every agent appends "attempt=A node=N step=S protected|committed" (MEMENTO_EVENT_LOG).
    std::string env = "MEMENTO_CAPTURE_LOG=" + dir + "/captured.log MEMENTO_EVENT_LOG=" + dir + "/events.log ", injects;
    std::string marker;
    for (const auto& f : plan.faults) {
      for (const auto& d : f.drills) injects += " --inject " + d;
      if (!f.fs_spec.empty()) injects += " --agent-arg --inject-fs --agent-arg " + f.fs_spec;
      if (f.kind == "flusher-kill") {
        marker = dir + "/flusher-killed";
        env += "MEMENTO_KILL_POINT=agent.flush_mid_write:rank=" + std::to_string(f.node) + ":once=" + marker + " ";
      }
    }
    const std::string cmd = "env " + env + o_.bin_dir + "/memento-run --simulate-nodes " + std::to_string(o_.nodes) +
                            " --ranks-per-node " + std::to_string(o_.ranks_per_node) + " --spares " +
                            std::to_string(plan.spares) + " --ec " + o_.ec + " --storage " + dir + "/storage" +
                            " --flush-every " + std::to_string(plan.flush_every) + " --hang-timeout " +
                            std::to_string(o_.hang_timeout_s) + " --max-restarts " +
                            std::to_string(plan.expected_failures + 4) + " --job " + job + " --work-dir " + dir +
                            "/work --timeline " + dir + "/timeline.json --quiet" + injects + " -- " + o_.bin_dir +
                            "/memento-train-example --quiet " + TrainArgs();
    if (o_.verbose) std::printf("  %s\n", cmd.c_str());
    int rc = 0;
    const std::string out = RunCommand(cmd, &rc);
    if (o_.drop_intents) {
      // As if the agents had never logged "protecting" or "committing": every restore after a node
      // loss then lacks the evidence that its version could be recovered.
      std::istringstream in(ReadFile(dir + "/events.log"));
      std::ofstream kept(dir + "/events.log", std::ios::trunc);
      for (std::string line; std::getline(in, line);) {
        if (line.find(" protecting") == std::string::npos && line.find(" committing") == std::string::npos) kept << line << "\n";
      }
    }
    std::vector<std::string> problems = Check(plan, rc, out, ReadFile(dir + "/timeline.json"), marker, dir, notes);
    for (const std::string& p : CheckRestoredVersions(ReadFile(dir + "/captured.log"), ReadFile(dir + "/timeline.json"))) {
      problems.push_back(p);
    }
    for (const std::string& p : CheckRestoresAfterLosses(ReadFile(dir + "/events.log"), ReadFile(dir + "/timeline.json"))) {
      problems.push_back(p);
    }
    if (problems.empty() && notes->empty()) {
      std::filesystem::remove_all(dir);
    } else {
      // A failed round, or one with a hang nobody injected: the agents' log says what they waited for.
      std::ofstream(dir + "/memento-run.out") << cmd << "\n" << out;
      const std::string kept = "kept " + dir + " (memento-run.out, timeline.json, work/agents.log)";
      (problems.empty() ? *notes : problems).push_back(kept);
    }
    // A failed memento-run keeps its nodes' shared memory for a second run; this one is done.
    RunCommand("rm -f /dev/shm/memento-" + job + "-*", &rc);
    return problems;
  }

 private:
  std::string TrainArgs() const {
    return "--steps " + std::to_string(o_.steps) + " --step-ms " + std::to_string(o_.step_ms);
  }

  std::vector<std::string> Check(const Plan& plan, int rc, const std::string& out, const std::string& timeline,
                                 const std::string& marker, const std::string& dir,
                                 std::vector<std::string>* notes) const {
    std::vector<std::string> bad;
    const std::vector<std::string> fs = Failures(timeline);
    // A node loss that left nothing recoverable (memory lost beyond the tolerance, or within it
    // before any version was erasure-coded, and no checkpoint committed): the job stops, saying
    // that it found no version to restore, rather than start over silently. Checked against the
    // agents' event log (CheckStopAfterLoss).
    bool stopped_unrecoverable = false;
    if (rc == 1 && out.find("found no version to restore") != std::string::npos && !fs.empty() &&
        Field(fs.back(), "kind") == "\"unrecoverable\"") {
      stopped_unrecoverable = true;
      for (const std::string& p : CheckStopAfterLoss(ReadFile(dir + "/events.log"), ReadFile(dir + "/captured.log"), timeline, notes)) bad.push_back(p);
    } else {
      if (rc != 0) bad.push_back("memento-run exited " + std::to_string(rc) + "; last lines:\n" + Tail(out, 8));
      const std::string hash = LastStateHash(out);
      if (hash != reference_) bad.push_back("state " + (hash.empty() ? "<none>" : hash) + " != reference " + reference_);
    }
    // The failures the plan caused: injected drills, and the agent-exit of a flusher kill. A hang
    // nobody injected (a rank silent for --hang-timeout under load) is a note, not an error: the
    // run must still end with the reference state, which is checked above.
    int flusher_node = -1;
    for (const auto& f : plan.faults) {
      if (f.kind == "flusher-kill") flusher_node = f.node;
    }
    // The agent's death is seen as its own exit, as the death of one of its ranks (whose client
    // lost its agent), or inside a failure that was being detected at that moment.
    auto is_flusher_kill = [&](const std::string& e) {
      if (flusher_node < 0) return false;
      const std::string detail = Field(e, "detail");
      if (detail.find("the agent of node " + std::to_string(flusher_node) + " ") != std::string::npos) return true;
      if (Field(e, "kind") != "\"rank-exit\"") return false;
      for (int r = 0; r < o_.ranks_per_node; ++r) {
        const int rank = flusher_node * o_.ranks_per_node + r;
        if (detail.rfind("\"rank " + std::to_string(rank) + " ", 0) == 0) return true;
      }
      return false;
    };
    int caused = 0;
    for (const auto& e : fs) {
      if (Field(e, "injected") == "true" || is_flusher_kill(e)) {
        ++caused;
      } else if (stopped_unrecoverable && Field(e, "kind") == "\"unrecoverable\"") {
        continue;  // the stop after the memory loss, checked above
      } else if (Field(e, "kind") == "\"hang\"") {
        notes->push_back("uninjected hang: " + Field(e, "detail"));
      } else {
        bad.push_back("failure nobody injected: " + e);
      }
    }
    // A stop ends the run before the faults planned after it.
    const int fewest = stopped_unrecoverable ? 0 : plan.expected_failures - (flusher_node >= 0 ? 1 : 0);
    if (caused < fewest || caused > plan.expected_failures) {
      bad.push_back("timeline has " + std::to_string(caused) + " injected failures, expected " +
                    std::to_string(fewest) +
                    (fewest < plan.expected_failures ? " to " + std::to_string(plan.expected_failures) : "") +
                    ": " + timeline);
    }
    // Each drill appears, injected, under its own kind.
    for (const auto& f : plan.faults) {
      for (const auto& d : f.drills) {
        const std::string kind = d.substr(0, d.find(':'));
        bool seen = false;
        for (const auto& e : fs) {
          seen = seen || (Field(e, "injected") == "true" && Field(e, "kind") == Quoted(kind) && HasDrill(e, d));
        }
        if (!seen && !stopped_unrecoverable) bad.push_back("drill " + d + " is not in the timeline");
      }
      if (f.kind == "node-loss-x2" || f.kind == "memory-loss") {
        // Lost at once: one failure names every drill. After a memory loss, storage serves the
        // lost nodes' ranks.
        const std::string* one = nullptr;
        for (const auto& e : fs) {
          bool all = true;
          for (const auto& d : f.drills) all = all && HasDrill(e, d);
          if (all) one = &e;
        }
        if (one == nullptr) {
          std::string drills;
          for (const auto& d : f.drills) drills += (drills.empty() ? "" : ", ") + d;
          bad.push_back(f.kind + " fired apart: " + drills);
        } else if (f.kind == "memory-loss" && Field(*one, "source") == "\"memory\"") {
          // A survivor may hold the checkpoint's step in memory too; the lost nodes' ranks cannot.
          bad.push_back("restored from memory alone after losing more nodes than --ec " + o_.ec + " tolerates: " + *one);
        }
      }
      if (f.kind == "flusher-kill") {
        struct stat st {};
        const bool killed = ::stat(marker.c_str(), &st) == 0;
        if (!killed && !stopped_unrecoverable) {
          bad.push_back("the flusher of node " + std::to_string(f.node) + " was never killed");
        }
        bool seen = false;
        for (const auto& e : fs) seen = seen || is_flusher_kill(e);
        // A kill while the job was already being stopped for another failure is absorbed into it.
        if (killed && !seen) notes->push_back("the flusher kill on node " + std::to_string(f.node) + " was absorbed into another failure");
      }
      if (!f.fs_spec.empty()) {
        // The fault fired (a flush failed with its error; unless the run stopped first), and
        // nothing reached storage as committed.
        const std::string error = f.kind == "storage-eio" ? "Input/output error" : "No space left on device";
        const std::string agents = ReadFile(dir + "/work/agents.log");
        if (agents.find(error) == std::string::npos && !stopped_unrecoverable) {
          bad.push_back(f.kind + " (" + f.fs_spec + "): no flush failed with \"" + error + "\" in work/agents.log");
        }
        std::error_code ec;
        for (const auto& job : std::filesystem::directory_iterator(dir + "/storage", ec)) {
          for (const auto& step : std::filesystem::directory_iterator(job.path(), ec)) {
            if (std::filesystem::exists(step.path() / "manifest")) {
              bad.push_back(f.kind + " (" + f.fs_spec + "): " + step.path().string() + " was committed");
            }
          }
        }
      }
    }
    // Every completed recovery restored a version at most the newest step reached, from memory or
    // a committed checkpoint of that step. Storage serves a restore with no memory lost when the
    // agents had reused the version's slots once it was persisted (the capture-log check below
    // still requires it to be the newest complete one): a note.
    for (const auto& e : fs) {
      if (Field(e, "resumed_after_s").rfind("-", 0) == 0) continue;  // interrupted by the next failure
      const long restored = Number(e, "restored_step"), last = Number(e, "last_step");
      if (restored == -1) {
        // Started over: only with no memory lost and the agents saying nothing was ever saved
        // (the capture-log check below requires that no version was complete).
        if (Field(e, "lost_nodes") != "[]" || Field(e, "source").find(kNothingSaved) == std::string::npos) {
          bad.push_back("the training started over, but not because nothing of the job had been saved: " + e);
        }
        continue;
      }
      if (restored < 0 || restored > last) bad.push_back("restored_step outside [0, last_step]: " + e);
      if (Number(e, "steps_lost") != last - restored) bad.push_back("steps_lost != last_step - restored_step: " + e);
      const std::string source = Field(e, "source");
      if (Field(e, "lost_nodes") == "[]" && source != "\"memory\"") {
        notes->push_back("restored from storage with no memory lost: " + Field(e, "source"));
      }
      {
        const std::string ckpt = dir + "/storage/";
        const std::string step_dir = "step-" + std::to_string(restored);
        bool ok = source.size() >= 2;
        std::string rest = ok ? source.substr(1, source.size() - 2) : "";
        for (size_t p = 0; ok && p <= rest.size();) {
          size_t q = rest.find(" + ", p);
          if (q == std::string::npos) q = rest.size();
          const std::string part = rest.substr(p, q - p);
          ok = part == "memory" || (part.rfind(ckpt, 0) == 0 && part.size() >= step_dir.size() &&
                                    part.compare(part.size() - step_dir.size(), step_dir.size(), step_dir) == 0);
          p = q + 3;
        }
        if (!ok) bad.push_back("restore source is neither memory nor " + ckpt + "<job>/" + step_dir + ": " + e);
      }
    }
    return bad;
  }

  // The restored version is the newest complete one. The capture log (MEMENTO_CAPTURE_LOG) says,
  // per attempt, rank and step, when the rank's copy landed ("copied", written before the rank
  // reports it) and when its agent acknowledged it ("acked"). For each completed recovery:
  //  - every rank copied the restored step, in the failed attempt or an earlier one (steps are
  //    deterministic: a version completed before an earlier restart holds the same bytes);
  //  - when no node's memory was lost, the restored step is at least the newest step whose
  //    captures were acknowledged for every rank in the failed attempt, and at least the step that
  //    attempt itself restored. (A rank killed between an event and its log line only loosens
  //    these bounds, never breaks them.)
  // With lost nodes the newest recoverable version depends on what was encoded or flushed in
  // time, which the trainer cannot see: those restores get the first check here, and their bounds
  // from the agents' event log (CheckRestoresAfterLosses).
  std::vector<std::string> CheckRestoredVersions(const std::string& log, const std::string& timeline) const {
    std::vector<std::string> bad;
    const int world = o_.nodes * o_.ranks_per_node;
    // event -> attempt -> step -> ranks
    std::map<std::string, std::map<long, std::map<long, std::vector<bool>>>> events;
    std::istringstream in(log);
    for (std::string line; std::getline(in, line);) {
      long a = -1, r = -1, st = -1;
      char event[16] = {};
      if (std::sscanf(line.c_str(), "attempt=%ld rank=%ld step=%ld %15s", &a, &r, &st, event) != 4 || r < 0 ||
          r >= world || (std::string(event) != "copied" && std::string(event) != "acked")) {
        bad.push_back("malformed capture log line: " + line);
        continue;
      }
      auto& ranks = events[event][a][st];
      ranks.resize(static_cast<size_t>(world));
      ranks[static_cast<size_t>(r)] = true;
    }
    auto all_ranks = [&](const std::string& event, long attempt, long step) {
      auto& by_attempt = events[event];
      auto it = by_attempt.find(attempt);
      if (it == by_attempt.end()) return false;
      auto jt = it->second.find(step);
      return jt != it->second.end() && std::count(jt->second.begin(), jt->second.end(), true) == world;
    };
    long previous_restore = 0;  // what the failed attempt started from (0: a fresh start)
    for (const auto& e : Failures(timeline)) {
      if (Field(e, "resumed_after_s").rfind("-", 0) == 0) continue;  // interrupted by the next failure
      const long attempt = Number(e, "attempt");
      const long restored = std::max(0L, Number(e, "restored_step"));  // -1: started over, from step 0
      bool was_copied = restored == 0;
      for (long a = 0; a <= attempt && !was_copied; ++a) was_copied = all_ranks("copied", a, restored);
      if (!was_copied) {
        bad.push_back("restored step " + std::to_string(restored) + " was never copied by all " + std::to_string(world) +
                      " ranks (capture log): " + e);
      }
      long newest = previous_restore;
      if (auto it = events["acked"].find(attempt); it != events["acked"].end()) {
        for (const auto& [step, ranks] : it->second) {
          if (all_ranks("acked", attempt, step)) newest = std::max(newest, step);
        }
      }
      if (Field(e, "lost_nodes") == "[]" && restored < newest) {
        bad.push_back("restored step " + std::to_string(restored) + ", but step " + std::to_string(newest) +
                      " was complete (all " + std::to_string(world) + " ranks' captures acknowledged in attempt " +
                      std::to_string(attempt) + ") and no memory was lost: " + e);
      }
      previous_restore = restored;
    }
    return bad;
  }

  // The run stopped because a recovery found no version to restore. With no node lost just
  // before, right only when no version had ever been complete (capture log). After a node loss,
  // right when nothing was recoverable: no step that every survivor recorded protected (within the
  // scheme's tolerance) and no committed checkpoint, up to the loss (a failure when there was
  // one). The "protecting" and "committing" lines bound the same sets from above: when they name
  // a step and the recorded lines do not (an agent died between the two, or a commit failed under
  // an injected storage fault), the outcome cannot be decided from the log: a note.
  std::vector<std::string> CheckStopAfterLoss(const std::string& log, const std::string& captures,
                                              const std::string& timeline, std::vector<std::string>* notes) const {
    EventLog events = EventLog::Parse(log);
    std::vector<std::string> bad = events.malformed;
    const std::vector<std::string> fs = Failures(timeline);
    std::set<long> nodes;
    for (int i = 0; i < o_.nodes; ++i) nodes.insert(i);
    const std::string* loss = nullptr;
    std::vector<long> survivors;
    for (size_t i = 0; i + 1 < fs.size(); ++i) {
      const std::vector<long> lost = Numbers(Field(fs[i], "lost_nodes")), added = Numbers(Field(fs[i], "replacements"));
      if (i + 2 == fs.size() && !lost.empty()) {
        loss = &fs[i];
        for (long n : nodes) {
          if (std::find(lost.begin(), lost.end(), n) == lost.end()) survivors.push_back(n);
        }
      }
      for (long n : lost) nodes.erase(n);
      for (long n : added) nodes.insert(n);
    }
    if (loss == nullptr) {
      // No memory was lost: right only when no version had ever been complete (every rank's
      // capture of one step acknowledged, capture log), so that nothing saved is lost.
      std::map<long, std::set<long>> acked;  // step -> ranks
      std::istringstream in(captures);
      for (std::string line; std::getline(in, line);) {
        long a = -1, r = -1, st = -1;
        char event[16] = {};
        if (std::sscanf(line.c_str(), "attempt=%ld rank=%ld step=%ld %15s", &a, &r, &st, event) == 4 &&
            std::string(event) == "acked") {
          acked[st].insert(r);
        }
      }
      for (const auto& [st, ranks] : acked) {
        if (static_cast<int>(ranks.size()) == o_.nodes * o_.ranks_per_node) {
          bad.push_back("memento-run found no version to restore with no memory lost, but every rank's capture of step " +
                        std::to_string(st) + " had been acknowledged (capture log): " + timeline);
          break;
        }
      }
      return bad;
    }
    const long attempt = Number(*loss, "attempt"), last = Number(*loss, "last_step");
    const bool within_tolerance = static_cast<int>(Numbers(Field(*loss, "lost_nodes")).size()) <= Tolerance(o_.ec);
    // The newest step of `by_attempt` (attempt -> node -> steps, up to `upto`) on every survivor.
    auto on_every_survivor = [&](const std::map<long, std::map<long, std::set<long>>>& by_attempt, long from,
                                 long upto) {
      long newest = -1;
      if (!within_tolerance || survivors.empty()) return newest;
      std::map<long, int> holders;  // step -> survivors that logged it
      for (long n : survivors) {
        std::set<long> steps;
        for (const auto& [a, by_node] : by_attempt) {
          auto it = by_node.find(n);
          if (a >= from && a <= upto && it != by_node.end()) steps.insert(it->second.begin(), it->second.end());
        }
        for (long st : steps) ++holders[st];
      }
      for (const auto& [st, count] : holders) {
        if (count == static_cast<int>(survivors.size()) && st <= last) newest = std::max(newest, st);
      }
      return newest;
    };
    auto newest_of = [&](const std::map<long, std::set<long>>& by_attempt) {
      long newest = -1;
      for (const auto& [a, steps] : by_attempt) {
        for (long st : steps) {
          if (a <= attempt && st <= last) newest = std::max(newest, st);
        }
      }
      return newest;
    };
    // Recorded in the failed attempt (what its agents held when the node died); begun in any
    // attempt up to the recovery (a survivor whose encode round finished as the node died records
    // it in the next one).
    const long recorded =
        std::max(on_every_survivor(events.protected_steps, attempt, attempt), newest_of(events.committed));
    const long begun = std::max(on_every_survivor(events.protecting, 0, attempt + 1), newest_of(events.committing));
    if (recorded >= 1) {
      bad.push_back("memento-run found no version to restore after losing node(s) " + Field(*loss, "lost_nodes") +
                    " at step " + std::to_string(last) + ", but step " + std::to_string(recorded) +
                    " had been erasure-coded on every survivor or committed (event log): " + *loss);
    } else if (begun >= 1) {
      notes->push_back("stopped with no version to restore after losing node(s) " + Field(*loss, "lost_nodes") +
                       "; step " + std::to_string(begun) +
                       " had begun to be protected or committed but was never recorded (event log)");
    }
    return bad;
  }

  // After a node loss the restore must be at least the newest version the surviving nodes could
  // rebuild or load: the newest step every surviving node recorded erasure-coded in the failed
  // attempt, and the newest checkpoint committed to storage (in that attempt or before, at most
  // the step reached). And it must be one that could be recovered at all: a step every survivor
  // had begun to record protected, or one whose commit had begun (the "protecting" and
  // "committing" lines, logged before anything records either). All from the agents' event log
  // (MEMENTO_EVENT_LOG).
  std::vector<std::string> CheckRestoresAfterLosses(const std::string& log, const std::string& timeline) const {
    EventLog events = EventLog::Parse(log);
    std::vector<std::string> bad = events.malformed;
    auto& protected_steps = events.protected_steps;
    const auto& committed = events.committed;
    std::set<long> nodes;  // the node ids of the current attempt
    for (int i = 0; i < o_.nodes; ++i) nodes.insert(i);
    for (const auto& e : Failures(timeline)) {
      const long attempt = Number(e, "attempt");
      const std::vector<long> lost = Numbers(Field(e, "lost_nodes")), added = Numbers(Field(e, "replacements"));
      const bool resumed = Field(e, "resumed_after_s").rfind("-", 0) != 0;
      if (!lost.empty() && resumed) {
        const long restored = Number(e, "restored_step"), last = Number(e, "last_step");
        std::vector<long> survivors;
        for (long n : nodes) {
          if (std::find(lost.begin(), lost.end(), n) == lost.end()) survivors.push_back(n);
        }
        long coded = -1;
        // Beyond the scheme's tolerance nothing in memory can be rebuilt: only storage counts.
        const bool within_tolerance = static_cast<int>(lost.size()) <= Tolerance(o_.ec);
        if (!survivors.empty() && within_tolerance) {
          const std::set<long>& first = protected_steps[attempt][survivors[0]];
          for (auto it = first.rbegin(); it != first.rend() && coded < 0; ++it) {
            bool everywhere = true;
            for (long n : survivors) everywhere = everywhere && protected_steps[attempt][n].count(*it) > 0;
            if (everywhere && *it <= last) coded = *it;
          }
        }
        long stored = -1;
        for (const auto& [a, steps] : committed) {
          if (a > attempt) break;
          for (long st : steps) {
            if (st <= last) stored = std::max(stored, st);
          }
        }
        if (restored < coded) {
          bad.push_back("restored step " + std::to_string(restored) + " after losing node(s) " + Field(e, "lost_nodes") +
                        ", but every surviving node had recorded step " + std::to_string(coded) +
                        " erasure-coded in attempt " + std::to_string(attempt) + " (event log): " + e);
        }
        if (restored < stored) {
          bad.push_back("restored step " + std::to_string(restored) + " after losing node(s) " + Field(e, "lost_nodes") +
                        ", but step " + std::to_string(stored) + " had been committed to storage (event log): " + e);
        }
        // And at most what could be recovered: a step every survivor had begun to record
        // protected (encoded, or rebuilt with its parity; within the tolerance) by the recovery
        // (a survivor whose encode round finished as the node died records it in the next
        // attempt), or one whose checkpoint commit had begun in this attempt or before; or none
        // (step 0).
        bool recoverable = restored == 0;
        for (const auto& [a, steps] : events.committing) {
          recoverable = recoverable || (a <= attempt && steps.count(restored) > 0);
        }
        if (!recoverable && within_tolerance && !survivors.empty()) {
          bool everywhere = true;
          for (long n : survivors) {
            bool here = false;
            for (const auto& [a, by_node] : events.protecting) {
              auto it = by_node.find(n);
              here = here || (a <= attempt + 1 && it != by_node.end() && it->second.count(restored) > 0);
            }
            everywhere = everywhere && here;
          }
          recoverable = everywhere;
        }
        if (!recoverable) {
          bad.push_back("restored step " + std::to_string(restored) + " after losing node(s) " + Field(e, "lost_nodes") +
                        ", but not every surviving node had begun to record it protected" +
                        std::string(within_tolerance ? "" : " (beyond the scheme's tolerance)") +
                        " and no checkpoint of it was being committed (event log): " + e);
        }
      }
      for (long n : lost) nodes.erase(n);
      for (long n : added) nodes.insert(n);
    }
    return bad;
  }

  // "[1,3]" -> {1, 3}.
  static std::vector<long> Numbers(const std::string& array) {
    std::vector<long> out;
    for (size_t p = array.find_first_of("0123456789"); p != std::string::npos;) {
      size_t q = array.find_first_not_of("0123456789", p);
      out.push_back(std::atol(array.substr(p, q - p).c_str()));
      p = q == std::string::npos ? q : array.find_first_of("0123456789", q);
    }
    return out;
  }

  static std::string Tail(const std::string& s, int lines) {
    size_t p = s.size();
    for (int i = 0; i <= lines && p != std::string::npos && p > 0; ++i) p = s.rfind('\n', p - 1);
    return p == std::string::npos ? s : s.substr(p + 1);
  }

  Options o_;
  std::string reference_;
};

void Usage(FILE* f) {
  std::fprintf(f,
               "usage: memento-stress [--rounds N] [--seed S] [--nodes 4] [--ranks-per-node 2] [--ec rs:2]\n"
               "                      [--steps 20] [--step-ms 40] [--hang-timeout 3] [--work-dir DIR]\n"
               "                      [--bin-dir DIR] [--jobs N] [--stop-on-failure] [--verbose] [--dry-run]\n"
               "Each round runs memento-train-example under memento-run with 1-3 faults drawn from the\n"
               "round's seed (S + round): rank-crash, hang, agent-crash, node-loss, node-loss-x2 (two nodes at\n"
               "once, when the scheme tolerates 2), node-loss-during-recovery, flusher-kill (an agent dies\n"
               "mid-write through MEMENTO_KILL_POINT), and in some rounds storage-full or storage-eio\n"
               "(every agent's storage fails after a few MiB) or memory-loss (m + 1 nodes at once after the\n"
               "other faults: the job resumes from storage, or stops when nothing was committed yet).\n"
               "Checks exit 0, the failure-free state_hash,\n"
               "every fault in the timeline, and each restore's step and source against the ranks' capture\n"
               "log and, after node losses, the agents' event log (at least the newest step erasure-coded\n"
               "on every survivor and the newest committed checkpoint; at most a step that was protected on\n"
               "every survivor or being committed).\n"
               "`--seed S --rounds 1` replays round S. `--jobs N` runs N rounds at once.\n"
               "Exit status: 0 all rounds passed; 1 a round failed; 2 bad options.\n");
}

int Main(int argc, char** argv) {
  Options o;
  bool hang_timeout_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "memento-stress: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--rounds") o.rounds = std::atoi(next().c_str());
    else if (a == "--seed") o.seed = std::strtoull(next().c_str(), nullptr, 10);
    else if (a == "--nodes") o.nodes = std::atoi(next().c_str());
    else if (a == "--ranks-per-node") o.ranks_per_node = std::atoi(next().c_str());
    else if (a == "--ec") o.ec = next();
    else if (a == "--steps") o.steps = std::atoi(next().c_str());
    else if (a == "--step-ms") o.step_ms = std::atoi(next().c_str());
    else if (a == "--hang-timeout") o.hang_timeout_s = std::atoi(next().c_str()), hang_timeout_given = true;
    else if (a == "--work-dir") o.work_dir = next();
    else if (a == "--bin-dir") o.bin_dir = next();
    else if (a == "--jobs") o.jobs = std::atoi(next().c_str());
    else if (a == "--stop-on-failure") o.keep_going = false;
    else if (a == "--verbose") o.verbose = true;
    else if (a == "--dry-run") o.dry_run = true;
    else if (a == "--corrupt-reference") o.corrupt_reference = true;
    else if (a == "--drop-intents") o.drop_intents = true;
    else if (a == "--help" || a == "-h") {
      Usage(stdout);
      return 0;
    } else {
      std::fprintf(stderr, "memento-stress: unknown flag %s\n", a.c_str());
      Usage(stderr);
      return 2;
    }
  }
  if (o.rounds < 1 || o.jobs < 1 || o.nodes < 2 || o.ranks_per_node < 1 || o.steps < 10 || Tolerance(o.ec) < 0) {
    std::fprintf(stderr, "memento-stress: need --rounds >= 1, --jobs >= 1, --nodes >= 2, --ranks-per-node >= 1, --steps >= 10 "
                         "and --ec none|xor|replicate:R|rs:M (got --ec %s)\n", o.ec.c_str());
    return 2;
  }
  if (Tolerance(o.ec) >= o.nodes) {
    std::fprintf(stderr, "memento-stress: --ec %s tolerates as many losses as there are nodes (%d)\n", o.ec.c_str(), o.nodes);
    return 2;
  }
  // Under a sanitizer (scripts/test-sanitizers sets MEMENTO_TEST_TIME_SCALE) every process is
  // slower: the default hang timeout grows with it, so that slow ranks are not taken for hung.
  if (const char* scale = std::getenv("MEMENTO_TEST_TIME_SCALE"); scale != nullptr && !hang_timeout_given) {
    o.hang_timeout_s = static_cast<int>(std::lround(o.hang_timeout_s * std::max(1.0, std::atof(scale))));
  }
  if (o.bin_dir.empty()) o.bin_dir = std::filesystem::read_symlink("/proc/self/exe").parent_path().string();
  if (o.work_dir.empty()) o.work_dir = "/tmp/memento-stress-" + std::to_string(::getpid());
  // What Open MPI needs as root on a small machine (as in tests/mpi_run.sh); kept when set.
  ::setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
  ::setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
  ::setenv("OMPI_MCA_rmaps_base_oversubscribe", "1", 0);
  ::setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 0);

  Stress stress(o);
  if (!o.dry_run && !stress.ComputeReference()) return 1;
  std::map<std::string, int> counts;
  std::vector<uint64_t> failing, noted;
  int passed = 0;
  std::mutex mu;                   // guards the tallies above and stdout
  std::atomic<int> next_round{0};
  int finished = 0;  // guarded by mu
  const auto started = std::chrono::steady_clock::now();
  std::atomic<bool> stop{false};
  auto worker = [&] {
    for (int r = next_round++; r < o.rounds && !stop; r = next_round++) {
      const Plan plan = Draw(o, o.seed + static_cast<uint64_t>(r));
      std::string what;
      for (const auto& f : plan.faults) {
        what += (what.empty() ? "" : ", ") + f.kind;
        for (const auto& d : f.drills) what += " " + d;
        if (f.node >= 0) what += " node=" + std::to_string(f.node);
        if (!f.fs_spec.empty()) what += " " + f.fs_spec;
      }
      if (o.dry_run) {
        std::lock_guard<std::mutex> lock(mu);
        for (const auto& f : plan.faults) ++counts[f.kind];
        std::printf("round %d seed %llu: %s; flush-every %d, spares %d\n", r, static_cast<unsigned long long>(plan.seed),
                    what.c_str(), plan.flush_every, plan.spares);
        continue;
      }
      std::vector<std::string> notes;
      const std::vector<std::string> problems = stress.Round(plan, &notes);
      std::lock_guard<std::mutex> lock(mu);
      for (const auto& f : plan.faults) ++counts[f.kind];
      if (++finished % 25 == 0) {
        std::printf("memento-stress: %d of %d rounds done, %zu failed, %.0f s\n", finished, o.rounds,
                    failing.size() + (problems.empty() ? 0 : 1),
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
      }
      if (!notes.empty()) {
        noted.push_back(plan.seed);
        for (const auto& n : notes) {
          std::printf("round %d seed %llu: note: %s\n", r, static_cast<unsigned long long>(plan.seed), n.c_str());
        }
      }
      if (problems.empty()) {
        ++passed;
        if (o.verbose) std::printf("round %d seed %llu: ok (%s)\n", r, static_cast<unsigned long long>(plan.seed), what.c_str());
      } else {
        failing.push_back(plan.seed);
        std::printf("round %d seed %llu: FAILED (%s; flush-every %d)\n", r, static_cast<unsigned long long>(plan.seed),
                    what.c_str(), plan.flush_every);
        for (const auto& p : problems) std::printf("    %s\n", p.c_str());
        std::printf("    replay: %s/memento-stress --seed %llu --rounds 1 --nodes %d --ranks-per-node %d --ec %s "
                    "--steps %d --step-ms %d\n",
                    o.bin_dir.c_str(), static_cast<unsigned long long>(plan.seed), o.nodes, o.ranks_per_node,
                    o.ec.c_str(), o.steps, o.step_ms);
        if (!o.keep_going) stop = true;
      }
      std::fflush(stdout);
    }
  };
  std::vector<std::thread> workers;
  for (int j = 1; j < (o.dry_run ? 1 : o.jobs); ++j) workers.emplace_back(worker);
  worker();
  for (auto& t : workers) t.join();
  std::sort(failing.begin(), failing.end());
  std::sort(noted.begin(), noted.end());
  if (o.dry_run) {
    std::printf("memento-stress: %d rounds planned (seed %llu), nothing run\n", o.rounds,
                static_cast<unsigned long long>(o.seed));
    for (const auto& [kind, n] : counts) std::printf("  %-26s %d\n", kind.c_str(), n);
    return 0;
  }
  std::printf("memento-stress: %d of %zu rounds passed (seed %llu, %d nodes x %d ranks, --ec %s, %d steps)\n", passed,
              static_cast<size_t>(passed) + failing.size(), static_cast<unsigned long long>(o.seed), o.nodes,
              o.ranks_per_node, o.ec.c_str(), o.steps);
  for (const auto& [kind, n] : counts) std::printf("  %-26s %d\n", kind.c_str(), n);
  if (!noted.empty()) {
    std::printf("seeds with uninjected hangs (passed):");
    for (uint64_t s : noted) std::printf(" %llu", static_cast<unsigned long long>(s));
    std::printf("\n");
  }
  if (!failing.empty()) {
    std::printf("failing seeds:");
    for (uint64_t s : failing) std::printf(" %llu", static_cast<unsigned long long>(s));
    std::printf("\n");
  }
  std::error_code ec;
  std::filesystem::remove(o.work_dir, ec);  // only when empty: failed rounds keep their directories
  return failing.empty() ? 0 : 1;
}

}  // namespace
}  // namespace memento::stress

int main(int argc, char** argv) { return memento::stress::Main(argc, argv); }
