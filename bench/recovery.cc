// memento-bench recovery: from a node loss to training resumed, under memento-run.
//
// Runs memento-train-example under memento-run on --nodes simulated nodes with a snapshot every
// step and loses the last node at --loss-at, twice:
//   1. memory: --ec SCHEME and a spare: the spare's agent rebuilds the lost node from its peers'
//      parity, every rank restores from memory;
//   2. storage: no erasure coding, --storage DIR flushing every version: the spare loads the lost
//      node's ranks from the checkpoint (the survivors still restore from memory).
// Each run's timeline (memento-run --timeline) gives detection, stopping the jobs, agent restart,
// re-registration of slots, rebuild (or storage load), restore and steps lost. The limits, in the
// same run: the goal "10 s + state per node / copy bandwidth" (memcpy of the node's state on this
// machine), and run 2 for run 1's in-memory recovery (goal: ≥ 10x faster).
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "bench/harness.h"
#include "bench/subcommands.h"
#include "core/shared_memory.h"
#include "core/thread_pool.h"

namespace memento::bench {
namespace {

constexpr const char* kUsage =
    "usage: memento-bench recovery [flags]\n"
    "  --nodes N            simulated nodes (default 4)\n"
    "  --ranks-per-node R   training ranks per node (default 2)\n"
    "  --ec SCHEME          erasure coding of the memory run (default rs:2; replicate:2 for 2 nodes)\n"
    "  --state-per-rank B   registered state per rank (parameters + 2 Adam moments), K/M/G suffixes;\n"
    "                       default: memento-train-example's default model (the demo's scale)\n"
    "  --layers L           blocks of the model (default 1 with --state-per-rank, else the example's)\n"
    "  --steps N            training steps (default 25)\n"
    "  --loss-at S          the last node is lost when a rank reaches step S (default 15)\n"
    "  --step-ms MS         pad each step to MS (default 100)\n"
    "  --storage DIR        checkpoint directory of the storage run (default: a fresh one under /tmp)\n"
    "  --no-storage         skip the storage run\n"
    "  --json               end with one line of JSON holding every figure\n";

constexpr double kGoalFixedSeconds = 10;
constexpr double kGoalSpeedup = 10;

struct Flags {
  int nodes = 4;
  int ranks_per_node = 2;
  std::string ec = "rs:2";
  uint64_t state_per_rank = 0;
  int layers = 0;
  int steps = 25;
  int loss_at = 15;
  double step_ms = 100;
  std::string storage;
  bool storage_run = true;
  bool json = false;
};

Status ParseFlags(int argc, char** argv, Flags* f, bool* help) {
  FlagReader r(argc, argv);
  bool no_storage = false;
  while (r.Next()) {
    const std::string& n = r.name();
    if (n == "--nodes") MEMENTO_RETURN_IF_ERROR(r.Int(&f->nodes, 2));
    else if (n == "--ranks-per-node") MEMENTO_RETURN_IF_ERROR(r.Int(&f->ranks_per_node, 1));
    else if (n == "--ec") MEMENTO_RETURN_IF_ERROR(r.String(&f->ec));
    else if (n == "--state-per-rank") MEMENTO_RETURN_IF_ERROR(r.Bytes(&f->state_per_rank));
    else if (n == "--layers") MEMENTO_RETURN_IF_ERROR(r.Int(&f->layers, 1));
    else if (n == "--steps") MEMENTO_RETURN_IF_ERROR(r.Int(&f->steps, 3));
    else if (n == "--loss-at") MEMENTO_RETURN_IF_ERROR(r.Int(&f->loss_at, 2));
    else if (n == "--step-ms") MEMENTO_RETURN_IF_ERROR(r.Double(&f->step_ms, 0));
    else if (n == "--storage") MEMENTO_RETURN_IF_ERROR(r.String(&f->storage));
    else if (n == "--no-storage") {
      MEMENTO_RETURN_IF_ERROR(r.Switch(&no_storage));
      f->storage_run = false;
    } else if (n == "--json") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->json));
    else if (n == "-h" || n == "--help") *help = true;
    else return r.Unknown();
  }
  if (f->loss_at >= f->steps) {
    return InvalidArgument("--loss-at " + std::to_string(f->loss_at) + " must come before the last step " +
                           std::to_string(f->steps));
  }
  return Status::Ok();
}

// The raw value text of "key" in a flat JSON object.
std::string Field(const std::string& obj, const std::string& key) {
  size_t p = obj.find("\"" + key + "\":");
  if (p == std::string::npos) return "";
  p += key.size() + 3;
  size_t end = obj[p] == '[' ? obj.find(']', p) + 1 : obj[p] == '"' ? obj.find('"', p + 1) + 1 : obj.find_first_of(",}", p);
  return obj.substr(p, end - p);
}
double Number(const std::string& obj, const std::string& key) { return std::atof(Field(obj, key).c_str()); }

struct Recovery {
  bool ok = false;
  std::string error;
  double detection = 0, stop = 0, agent_restart = 0, registration = 0, rebuild = 0, restore = 0, total = 0;
  int64_t restored_step = -1, steps_lost = -1;
  std::string source;
  uint64_t rank0_state = 0;  // bytes of registered state of rank 0, as the example printed it
};

Recovery RunOnce(const Flags& f, const std::string& name, const std::string& protection, int hidden, int layers) {
  Recovery out;
  const std::string bin = ExecutableDir();
  const std::string job = "bench-recovery-" + name + "-" + std::to_string(::getpid());
  const std::string work = "/tmp/memento-" + job;
  RemoveOnFatalSignal(work);
  const int last = f.nodes - 1;
  std::string cmd = bin + "/memento-run --simulate-nodes " + std::to_string(f.nodes) + " --ranks-per-node " +
                    std::to_string(f.ranks_per_node) + " --spares 1 --job " + job + " --work-dir " + work +
                    " --quiet --hang-timeout 600 " + protection + " --inject node-loss:node=" + std::to_string(last) +
                    ":step=" + std::to_string(f.loss_at) + " -- " + bin + "/memento-train-example --steps " +
                    std::to_string(f.steps) + " --step-ms " + std::to_string(static_cast<int>(f.step_ms)) + " --tp 1";
  if (hidden > 0) cmd += " --hidden " + std::to_string(hidden) + " --batch 1";
  if (layers > 0) cmd += " --layers " + std::to_string(layers);
  cmd += " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  const int st = ::pclose(p);
  std::ifstream tl(work + "/timeline.json");
  std::stringstream ss;
  ss << tl.rdbuf();
  const std::string json = ss.str();
  std::error_code ec;
  std::filesystem::remove_all(work, ec);
  ForgetOnFatalSignal(work);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    out.error = "memento-run failed (" + std::to_string(st) + "):\n" + text.substr(text.size() > 3000 ? text.size() - 3000 : 0);
    return out;
  }
  if (size_t r0 = text.find("(rank 0: "); r0 != std::string::npos) out.rank0_state = std::strtoull(text.c_str() + r0 + 9, nullptr, 10);
  const size_t fpos = json.find("{\"attempt\"");
  if (fpos == std::string::npos) {
    out.error = "no failure in the timeline: " + json;
    return out;
  }
  const std::string fj = json.substr(fpos, json.find('}', fpos) - fpos + 1);
  out.detection = Number(fj, "detection_latency_s");
  out.stop = Number(fj, "stop_s");
  out.agent_restart = Number(fj, "agent_restart_s");
  out.registration = Number(fj, "registration_s");
  out.rebuild = Number(fj, "rebuild_s");
  out.restore = Number(fj, "restore_s");
  out.total = Number(fj, "resumed_after_s");
  out.restored_step = static_cast<int64_t>(Number(fj, "restored_step"));
  out.steps_lost = static_cast<int64_t>(Number(fj, "steps_lost"));
  out.source = Field(fj, "source");
  if (out.source.size() >= 2) out.source = out.source.substr(1, out.source.size() - 2);
  out.ok = out.total > 0;
  if (!out.ok) out.error = "the timeline shows no resumed training: " + fj;
  return out;
}

void Print(const char* name, const Recovery& r) {
  std::printf(
      "  %-8s resumed %.2f s after the loss: detection %.2f, stop %.2f, agent restart %.2f, registration %.2f, "
      "rebuild/load %.2f, restore %.2f; restored step %lld from %s, %lld step(s) lost\n",
      name, r.total, r.detection, r.stop, r.agent_restart, r.registration, r.rebuild, r.restore,
      static_cast<long long>(r.restored_step), r.source.c_str(), static_cast<long long>(r.steps_lost));
}

void AddRecovery(JsonLine* j, const std::string& prefix, const Recovery& r) {
  j->Add(prefix + "_total_s", r.total)
      .Add(prefix + "_detection_s", r.detection)
      .Add(prefix + "_stop_s", r.stop)
      .Add(prefix + "_agent_restart_s", r.agent_restart)
      .Add(prefix + "_registration_s", r.registration)
      .Add(prefix + "_rebuild_s", r.rebuild)
      .Add(prefix + "_restore_s", r.restore)
      .Add(prefix + "_steps_lost", r.steps_lost)
      .Add(prefix + "_source", r.source);
}

}  // namespace

int RecoveryMain(int argc, char** argv) {
  Flags f;
  bool help = false;
  if (Status st = ParseFlags(argc, argv, &f, &help); !st.ok()) {
    std::fprintf(stderr, "memento-bench recovery: %s\n\n%s", st.message().c_str(), kUsage);
    return kExitUsage;
  }
  if (help) {
    std::printf("%s", kUsage);
    return kExitOk;
  }
  int hidden = 0, layers = f.layers;
  if (f.state_per_rank > 0) {
    // State per rank at --tp 1: 3 copies (value, exp_avg, exp_avg_sq) of ~8 H^2 fp32 per block.
    if (layers == 0) layers = 1;
    hidden = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(f.state_per_rank) / (12.0 * 8.0 * layers))));
  }
  std::string storage = f.storage;
  bool own_storage = false;
  if (f.storage_run && storage.empty()) {
    char tmpl[] = "/tmp/memento-bench-recovery-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) {
      std::fprintf(stderr, "memento-bench recovery: cannot create a storage directory under /tmp\n");
      return kExitFailed;
    }
    storage = tmpl;
    own_storage = true;
    RemoveOnFatalSignal(storage);
  }
  std::printf("recovery: %d simulated nodes x %d ranks, memento-train-example (%s), loss of node %d at step %d of %d\n",
              f.nodes, f.ranks_per_node,
              hidden > 0 ? ("hidden " + std::to_string(hidden) + ", " + std::to_string(layers) + " layer(s), batch 1").c_str()
                         : "default model",
              f.nodes - 1, f.loss_at, f.steps);
  std::fflush(stdout);
  Recovery mem = RunOnce(f, "memory", "--ec " + f.ec, hidden, layers);
  if (!mem.ok) {
    std::fprintf(stderr, "memento-bench recovery: memory run: %s\n", mem.error.c_str());
    return kExitFailed;
  }
  Recovery sto;
  if (f.storage_run) {
    sto = RunOnce(f, "storage", "--storage " + storage + " --flush-every 1", hidden, layers);
    if (own_storage) {
      std::error_code ec;
      std::filesystem::remove_all(storage, ec);
      ForgetOnFatalSignal(storage);
    }
    if (!sto.ok) {
      std::fprintf(stderr, "memento-bench recovery: storage run: %s\n", sto.error.c_str());
      return kExitFailed;
    }
    if (sto.source == "memory") {
      std::fprintf(stderr, "memento-bench recovery: the storage run restored from memory, not storage\n");
      return kExitFailed;
    }
  }
  // The copy-bandwidth limit: memcpy of one node's state on this machine.
  const uint64_t node_state = mem.rank0_state * static_cast<uint64_t>(f.ranks_per_node);
  const uint64_t probe = std::max<uint64_t>(std::min<uint64_t>(node_state, uint64_t{1} << 30), uint64_t{64} << 20);
  auto a = HostBuffer::Create(probe, 1);
  auto b = HostBuffer::Create(probe, 2);
  if (!a.ok() || !b.ok()) {
    std::fprintf(stderr, "memento-bench recovery: cannot allocate %s for the memcpy probe\n", FormatBytes(probe).c_str());
    return kExitFailed;
  }
  ThreadPool pool(4);
  Samples copy;
  for (int i = 0; i < 3; ++i) copy.Add(ParallelMemcpy(&pool, {{(*b)->data(), (*a)->data(), probe}}, size_t{8} << 20));
  const double copy_gbps = GBps(probe, copy.Median());
  const double goal_s = kGoalFixedSeconds + (copy_gbps > 0 ? node_state / (copy_gbps * 1e9) : 0);
  std::printf("  state: %s per rank, %s per node; memcpy %.2f GB/s\n", FormatBytes(mem.rank0_state).c_str(),
              FormatBytes(node_state).c_str(), copy_gbps);
  Print("memory", mem);
  if (f.storage_run) Print("storage", sto);
  std::printf("  memory recovery %.2f s = %.2f of the goal (10 s + state per node / copy bandwidth = %.2f s); "
              "steps lost %lld (goal <= 1)\n",
              mem.total, mem.total / goal_s, goal_s, static_cast<long long>(mem.steps_lost));
  double speedup = 0, restore_speedup = 0;
  if (f.storage_run) {
    speedup = mem.total > 0 ? sto.total / mem.total : 0;
    const double mem_restore = mem.rebuild + mem.restore, sto_restore = sto.rebuild + sto.restore;
    restore_speedup = mem_restore > 0 ? sto_restore / mem_restore : 0;
    std::printf("  storage / memory: %.2fx end to end, %.2fx for rebuild+restore alone (goal >= %.0fx)\n", speedup,
                restore_speedup, kGoalSpeedup);
  }
  if (f.json) {
    JsonLine j;
    j.Add("bench", "recovery")
        .Add("nodes", f.nodes)
        .Add("ranks_per_node", f.ranks_per_node)
        .Add("ec", f.ec)
        .Add("state_per_rank_bytes", mem.rank0_state)
        .Add("state_per_node_bytes", node_state)
        .Add("copy_gbps", copy_gbps)
        .Add("goal_s", goal_s)
        .Add("ratio_to_goal", mem.total / goal_s);
    AddRecovery(&j, "memory", mem);
    if (f.storage_run) {
      AddRecovery(&j, "storage", sto);
      j.Add("storage_over_memory", speedup).Add("storage_over_memory_restore", restore_speedup);
    }
    j.Add("goal_speedup", kGoalSpeedup);
    std::printf("%s\n", j.str().c_str());
  }
  return kExitOk;
}

}  // namespace memento::bench
