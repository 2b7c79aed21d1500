// memento-run's flag parsing.
#include "launcher/options.h"

#include <cctype>
#include <charconv>
#include <cstdlib>
#include <string_view>

#include "erasure/scheme.h"

namespace memento::launcher {

const char* const kUsage =
    "usage: memento-run [options] -- <training command...>\n"
    "Starts one memento-agent per node and the training job (R ranks per node), watches both, and on\n"
    "a failure stops them, replaces lost nodes with spares, restarts the agents (which rebuild lost\n"
    "memory from parity) and restarts training from the newest recoverable version.\n"
    "Nodes:\n"
    "  --simulate-nodes N     N simulated nodes on this machine (each its own agent, memory, catalog)\n"
    "  --hostfile F           one host per line ('host' or 'host slots=N'); the last --spares are spares\n"
    "  --ranks-per-node R     training ranks per node (default 1)\n"
    "  --spares S             idle nodes that replace lost ones (default 0)\n"
    "Protection and storage (passed to the agents):\n"
    "  --ec SCHEME            none | replicate:R | xor | rs:M (default none)\n"
    "  --group-size N         nodes per parity group (default: all)\n"
    "  --storage DIR          flush checkpoints to DIR/<job>/step-<N>/\n"
    "  --flush-every K        flush every K-th version (default: any)\n"
    "  --restore-from DIR     resume from this universal or native checkpoint, in any layout, when\n"
    "                         memory and --storage hold nothing newer (needs --storage)\n"
    "  --agent-arg X          one more memento-agent argument (repeatable)\n"
    "Supervision:\n"
    "  --max-restarts K       restarts allowed before giving up (default 3)\n"
    "  --hang-timeout S       a rank silent for S seconds is hung (default 300; 0 = off)\n"
    "  --stop-grace S         SIGTERM, then SIGKILL after S seconds (default 5)\n"
    "  --start-timeout S      agents must serve within S seconds (default 60)\n"
    "Drills (repeatable; each fires once, when a rank of its target reaches Snapshot(step);\n"
    "drills of the same step fire together, as one failure):\n"
    "  --inject node-loss:node=I:step=S     kill node I (its agent and ranks) and delete its memory\n"
    "  --inject node-loss:node=I:during=recovery   the same, during the next recovery\n"
    "  --inject rank-crash:rank=R:step=S    SIGKILL rank R\n"
    "  --inject hang:rank=R:step=S          SIGSTOP rank R (detected by --hang-timeout)\n"
    "  --inject agent-crash:node=I:step=S   SIGKILL node I's agent (its memory survives)\n"
    "Other:\n"
    "  --job ID               job id (default run-<time>-<pid>)\n"
    "  --work-dir DIR         node-local state: DIR/node-<id>/ (default /tmp/memento-run-<job>)\n"
    "  --timeline FILE        the failure timeline as JSON (default <work-dir>/timeline.json)\n"
    "  --launcher L           auto | mpirun | srun (default auto: srun when SLURM_JOB_ID is set)\n"
    "  --mpirun-arg X         one more mpirun/srun argument for both jobs (repeatable)\n"
    "  --agent-bin PATH       memento-agent to run (default: next to memento-run)\n"
    "  --quiet                print only the summary\n"
    "Each rank gets MEMENTO_JOB_ID, MEMENTO_JOB_TOKEN, MEMENTO_AGENT_SOCKET, MEMENTO_RANKS_PER_NODE,\n"
    "MEMENTO_NODE_IDS, MEMENTO_RESTORE=latest, MEMENTO_HEARTBEAT and MEMENTO_ATTEMPT in its environment.\n"
    "Exit status: the training's 0 on success; 1 when restarts ran out or nothing was recoverable;\n"
    "2 for bad options.\n";

namespace {

template <typename T>
bool ParseNumber(std::string_view text, T* out) {
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, *out);
  return ec == std::errc() && ptr == end && !text.empty();
}

bool ParseSeconds(std::string_view text, double* out) {
  std::string s(text);
  char* end = nullptr;
  *out = std::strtod(s.c_str(), &end);
  return !s.empty() && end != nullptr && *end == '\0' && *out >= 0;
}

}  // namespace

const char* InjectionKindName(Injection::Kind k) {
  switch (k) {
    case Injection::Kind::kNodeLoss: return "node-loss";
    case Injection::Kind::kRankCrash: return "rank-crash";
    case Injection::Kind::kHang: return "hang";
    case Injection::Kind::kAgentCrash: return "agent-crash";
  }
  return "?";
}

std::vector<size_t> StepDrillsFired(const std::vector<Injection>& drills, const std::vector<bool>& fired, int rank,
                                    int node, int64_t step, const std::function<bool(int)>& rank_known) {
  std::vector<size_t> out;
  std::vector<bool> taken = fired;
  for (size_t i = 0; i < drills.size(); ++i) {
    const Injection& in = drills[i];
    if (taken[i] || in.during_recovery || step < in.step || in.target != (TargetsNode(in) ? node : rank)) continue;
    taken[i] = true;
    out.push_back(i);
    for (size_t j = 0; j < drills.size(); ++j) {
      const Injection& other = drills[j];
      if (taken[j] || other.during_recovery || other.step != in.step) continue;
      if (!TargetsNode(other) && !rank_known(other.target)) continue;
      taken[j] = true;
      out.push_back(j);
    }
  }
  return out;
}

Result<Injection> ParseInjection(const std::string& spec) {
  Injection in;
  in.spec = spec;
  std::vector<std::string> parts;
  for (size_t pos = 0;;) {
    size_t colon = spec.find(':', pos);
    parts.push_back(spec.substr(pos, colon == std::string::npos ? std::string::npos : colon - pos));
    if (colon == std::string::npos) break;
    pos = colon + 1;
  }
  const std::string& kind = parts[0];
  const char* target_key = nullptr;
  if (kind == "node-loss") {
    in.kind = Injection::Kind::kNodeLoss;
    target_key = "node";
  } else if (kind == "rank-crash") {
    in.kind = Injection::Kind::kRankCrash;
    target_key = "rank";
  } else if (kind == "hang") {
    in.kind = Injection::Kind::kHang;
    target_key = "rank";
  } else if (kind == "agent-crash") {
    in.kind = Injection::Kind::kAgentCrash;
    target_key = "node";
  } else {
    return InvalidArgument("--inject '" + spec + "': unknown kind '" + kind +
                           "' (node-loss, rank-crash, hang or agent-crash)");
  }
  bool have_target = false, have_step = false;
  for (size_t i = 1; i < parts.size(); ++i) {
    const size_t eq = parts[i].find('=');
    const std::string key = parts[i].substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : parts[i].substr(eq + 1);
    if (key == target_key) {
      if (!ParseNumber(value, &in.target) || in.target < 0) {
        return InvalidArgument("--inject '" + spec + "': " + key + " must be a non-negative integer, got '" + value + "'");
      }
      have_target = true;
    } else if (key == "step") {
      if (!ParseNumber(value, &in.step) || in.step < 1) {
        return InvalidArgument("--inject '" + spec + "': step must be a positive integer, got '" + value + "'");
      }
      have_step = true;
    } else if (key == "during" && in.kind == Injection::Kind::kNodeLoss) {
      if (value != "recovery") {
        return InvalidArgument("--inject '" + spec + "': during must be 'recovery', got '" + value + "'");
      }
      in.during_recovery = true;
    } else {
      return InvalidArgument("--inject '" + spec + "': unexpected '" + parts[i] + "' (" + kind + " takes " +
                             target_key + "=N and step=S" +
                             (in.kind == Injection::Kind::kNodeLoss ? " or during=recovery" : "") + ")");
    }
  }
  if (!have_target) return InvalidArgument("--inject '" + spec + "': needs " + target_key + "=N");
  if (have_step == in.during_recovery) {
    return InvalidArgument("--inject '" + spec + "': needs " +
                           (in.during_recovery ? std::string("either step=S or during=recovery, not both")
                                               : std::string("step=S")));
  }
  return in;
}

Result<Options> ParseOptions(int argc, const char* const* argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") {
      for (int j = i + 1; j < argc; ++j) o.command.push_back(argv[j]);
      break;
    }
    if (arg == "-h" || arg == "--help") {
      o.help = true;
      return o;
    }
    if (arg == "--quiet") {
      o.quiet = true;
      continue;
    }
    std::string value;
    if (size_t eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else if (arg.rfind("--", 0) == 0) {
      if (i + 1 >= argc) return InvalidArgument(arg + " needs a value");
      value = argv[++i];
    } else {
      return InvalidArgument("unexpected argument '" + arg + "': the training command goes after '--'");
    }
    auto integer = [&](int* out, int min) -> Status {
      if (!ParseNumber(value, out) || *out < min) {
        return InvalidArgument(arg + " expects an integer >= " + std::to_string(min) + ", got '" + value + "'");
      }
      return Status::Ok();
    };
    auto seconds = [&](double* out) -> Status {
      if (!ParseSeconds(value, out)) {
        return InvalidArgument(arg + " expects a non-negative number of seconds, got '" + value + "'");
      }
      return Status::Ok();
    };
    if (arg == "--hostfile") {
      o.hostfile = value;
    } else if (arg == "--simulate-nodes") {
      MEMENTO_RETURN_IF_ERROR(integer(&o.simulate_nodes, 1));
    } else if (arg == "--ranks-per-node") {
      MEMENTO_RETURN_IF_ERROR(integer(&o.ranks_per_node, 1));
    } else if (arg == "--spares") {
      MEMENTO_RETURN_IF_ERROR(integer(&o.spares, 0));
    } else if (arg == "--ec") {
      Result<Scheme> scheme = Scheme::Parse(value);
      if (!scheme.ok()) return InvalidArgument("--ec: " + scheme.status().message());
      o.ec = value;
    } else if (arg == "--group-size") {
      MEMENTO_RETURN_IF_ERROR(integer(&o.group_size, 1));
    } else if (arg == "--storage") {
      o.storage = value;
    } else if (arg == "--restore-from") {
      o.restore_from = value;
    } else if (arg == "--flush-every") {
      MEMENTO_RETURN_IF_ERROR(integer(&o.flush_every, 1));
    } else if (arg == "--max-restarts") {
      MEMENTO_RETURN_IF_ERROR(integer(&o.max_restarts, 0));
    } else if (arg == "--hang-timeout") {
      MEMENTO_RETURN_IF_ERROR(seconds(&o.hang_timeout_s));
    } else if (arg == "--stop-grace") {
      MEMENTO_RETURN_IF_ERROR(seconds(&o.stop_grace_s));
    } else if (arg == "--start-timeout") {
      MEMENTO_RETURN_IF_ERROR(seconds(&o.start_timeout_s));
    } else if (arg == "--inject") {
      MEMENTO_ASSIGN_OR_RETURN(Injection in, ParseInjection(value));
      o.injections.push_back(in);
    } else if (arg == "--job") {
      o.job = value;
    } else if (arg == "--work-dir") {
      o.work_dir = value;
    } else if (arg == "--timeline") {
      o.timeline = value;
    } else if (arg == "--launcher") {
      if (value == "auto") o.launcher = Launcher::kAuto;
      else if (value == "mpirun") o.launcher = Launcher::kMpirun;
      else if (value == "srun") o.launcher = Launcher::kSrun;
      else return InvalidArgument("--launcher expects auto, mpirun or srun, got '" + value + "'");
    } else if (arg == "--agent-arg") {
      o.agent_args.push_back(value);
    } else if (arg == "--mpirun-arg") {
      o.mpirun_args.push_back(value);
    } else if (arg == "--agent-bin") {
      o.agent_bin = value;
    } else {
      return InvalidArgument("unknown option '" + arg + "' (see --help)");
    }
  }
  if (o.command.empty()) return InvalidArgument("no training command: put it after '--'");
  if (!o.restore_from.empty() && o.storage.empty()) {
    return InvalidArgument("--restore-from needs --storage (where the resumed job's checkpoints go)");
  }
  if (o.hostfile.empty() == (o.simulate_nodes == 0)) {
    return InvalidArgument("give exactly one of --hostfile F and --simulate-nodes N");
  }
  for (char c : o.job) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return InvalidArgument("--job '" + o.job + "' may hold only letters, digits, '-', '_' and '.'");
    }
  }
  for (const Injection& in : o.injections) {
    const bool node = TargetsNode(in);
    if (node && o.simulate_nodes > 0 && in.target >= o.simulate_nodes) {
      return InvalidArgument("--inject '" + in.spec + "': there are only " + std::to_string(o.simulate_nodes) +
                             " nodes (ids 0.." + std::to_string(o.simulate_nodes - 1) + ")");
    }
    if (!node && o.simulate_nodes > 0 && in.target >= o.simulate_nodes * o.ranks_per_node) {
      return InvalidArgument("--inject '" + in.spec + "': there are only " +
                             std::to_string(o.simulate_nodes * o.ranks_per_node) + " ranks");
    }
  }
  if (!o.injections.empty() && o.simulate_nodes == 0) {
    return InvalidArgument("--inject needs --simulate-nodes: drills kill local processes and delete local memory");
  }
  return o;
}

}  // namespace memento::launcher
