// Command lines for the agents' and the training job.
#include "launcher/commands.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace memento::launcher {
namespace {

std::string Join(const std::vector<int>& v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + std::to_string(v[i]);
  return out;
}

std::string Join(const std::vector<std::string>& v, const std::string& suffix) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + v[i] + suffix;
  return out;
}

// The launch prefix for `per_node` processes on each node of the plan.
std::vector<std::string> LaunchPrefix(const Options& o, const NodePlan& plan, bool srun, int per_node,
                                      const std::vector<std::pair<std::string, std::string>>& env) {
  const int nodes = static_cast<int>(plan.ids.size());
  const std::string np = std::to_string(nodes * per_node);
  std::vector<std::string> argv;
  if (srun) {
    argv = {"srun", "--nodes=" + std::to_string(nodes), "--ntasks=" + np,
            "--ntasks-per-node=" + std::to_string(per_node), "--distribution=block", "--kill-on-bad-exit=1",
            "--export=ALL"};
    if (!plan.hosts.empty()) argv.push_back("--nodelist=" + Join(plan.hosts, ""));
  } else {
    argv = {"mpirun", "-np", np};
    if (plan.hosts.empty()) {
      argv.insert(argv.end(), {"--oversubscribe", "--bind-to", "none"});
    } else {
      argv.insert(argv.end(), {"--host", Join(plan.hosts, ":" + std::to_string(per_node)), "--map-by",
                               "ppr:" + std::to_string(per_node) + ":node"});
    }
    for (const auto& [name, value] : env) argv.insert(argv.end(), {"-x", name});
  }
  argv.insert(argv.end(), o.mpirun_args.begin(), o.mpirun_args.end());
  return argv;
}

}  // namespace

std::string Command::ToString() const {
  std::string out;
  for (const std::string& a : argv) {
    bool plain = !a.empty();
    for (char c : a) {
      if (!(std::isalnum(static_cast<unsigned char>(c)) || std::string_view("-_./:=,%@+").find(c) != std::string_view::npos)) {
        plain = false;
      }
    }
    out += (out.empty() ? "" : " ") + (plain ? a : "'" + a + "'");
  }
  return out;
}

bool UsesSrun(const Options& o, bool slurm_job_present) {
  return o.launcher == Launcher::kSrun || (o.launcher == Launcher::kAuto && slurm_job_present);
}

std::string NodeDirPattern(const std::string& work_dir) { return work_dir + "/node-%n"; }

Command AgentCommand(const Options& o, const NodePlan& plan, bool srun, const std::string& agent_bin,
                     const std::string& work_dir, const std::string& token, int attempt) {
  Command c;
  c.env = {{"MEMENTO_JOB_TOKEN", token}};
  if (attempt >= 0) c.env.push_back({"MEMENTO_ATTEMPT", std::to_string(attempt)});
  c.argv = LaunchPrefix(o, plan, srun, 1, c.env);
  // The agent's checksum, flush and encoding threads need the node's cores: a launcher's default
  // binding (one core per process) would put them all on one.
  if (srun) {
    c.argv.insert(c.argv.begin() + 1, "--cpu-bind=none");
  } else if (!plan.hosts.empty()) {
    c.argv.insert(c.argv.begin() + 3, {"--bind-to", "none"});
  }
  const std::string node = NodeDirPattern(work_dir);
  c.argv.insert(c.argv.end(), {agent_bin, "--job", o.job, "--socket", node + "/agent.sock", "--catalog",
                               node + "/catalog", "--pid-file", node + "/agent.pid", "--node-ids", Join(plan.ids)});
  if (o.ec != "none") {
    c.argv.insert(c.argv.end(), {"--ec", o.ec});
    if (o.group_size > 0) c.argv.insert(c.argv.end(), {"--group-size", std::to_string(o.group_size)});
  }
  if (!o.storage.empty()) {
    c.argv.insert(c.argv.end(), {"--storage", o.storage});
    if (o.flush_every > 0) c.argv.insert(c.argv.end(), {"--flush-every", std::to_string(o.flush_every)});
    if (!o.restore_from.empty()) c.argv.insert(c.argv.end(), {"--restore-from", o.restore_from});
  }
  c.argv.insert(c.argv.end(), o.agent_args.begin(), o.agent_args.end());
  return c;
}

Command TrainingCommand(const Options& o, const NodePlan& plan, bool srun, const std::string& work_dir,
                        const std::string& token, const std::string& heartbeat, const std::string& restore,
                        int attempt) {
  Command c;
  c.env = {{"MEMENTO_JOB_ID", o.job},
           {"MEMENTO_JOB_TOKEN", token},
           {"MEMENTO_AGENT_SOCKET", NodeDirPattern(work_dir) + "/agent.sock"},
           {"MEMENTO_RANKS_PER_NODE", std::to_string(o.ranks_per_node)},
           {"MEMENTO_NODE_IDS", Join(plan.ids)},
           {"MEMENTO_RESTORE", restore},
           {"MEMENTO_HEARTBEAT", heartbeat},
           {"MEMENTO_ATTEMPT", std::to_string(attempt)}};
  c.argv = LaunchPrefix(o, plan, srun, o.ranks_per_node, c.env);
  c.argv.insert(c.argv.end(), o.command.begin(), o.command.end());
  return c;
}

Result<std::vector<std::string>> ReadHostfile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFound("cannot read the hostfile " + path);
  std::vector<std::string> hosts;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (size_t hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    std::string host, extra;
    if (!(words >> host)) continue;
    while (words >> extra) {
      if (extra.rfind("slots=", 0) != 0 && extra.rfind("max_slots=", 0) != 0) {
        return InvalidArgument("hostfile " + path + " line " + std::to_string(n) + ": unexpected '" + extra +
                               "' (expected 'host' or 'host slots=N')");
      }
    }
    for (const std::string& h : hosts) {
      if (h == host) {
        return InvalidArgument("hostfile " + path + " line " + std::to_string(n) + ": host '" + host +
                               "' is listed twice");
      }
    }
    hosts.push_back(host);
  }
  if (hosts.empty()) return InvalidArgument("hostfile " + path + " lists no host");
  return hosts;
}

std::string MpiTmpdirBase() {
  for (const char* var : {"OMPI_MCA_orte_tmpdir_base", "TMPDIR", "TEMP", "TMP"}) {
    const char* v = std::getenv(var);
    if (v != nullptr && *v != '\0') return v;
  }
  return "/tmp";
}

int RemoveMpiSessionDir(int64_t pid, const std::string& base) {
  if (pid <= 0) return 0;
  const std::string suffix = "." + std::to_string(::getuid());
  int removed = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(base, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("ompi.", 0) != 0 || name.size() <= 5 + suffix.size() ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      continue;
    }
    std::error_code rm;
    if (std::filesystem::remove_all(e.path() / ("pid." + std::to_string(pid)), rm) > 0 && !rm) ++removed;
  }
  return removed;
}

}  // namespace memento::launcher
