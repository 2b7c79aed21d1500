// memento-run's supervisor: attempts, heartbeats, drills, stops, node replacement.
#include "launcher/supervisor.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/file_system.h"
#include "proto/version.h"

namespace memento::launcher {
namespace {

std::atomic<int> g_signal{0};
void OnSignal(int sig) { g_signal.store(sig); }

std::string RandomToken() {
  unsigned char bytes[16] = {};
  std::ifstream in("/dev/urandom", std::ios::binary);
  in.read(reinterpret_cast<char*>(bytes), sizeof bytes);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned char b : bytes) {
    out += hex[b >> 4];
    out += hex[b & 15];
  }
  return out;
}

std::string ExitText(int status) {
  if (WIFEXITED(status)) return "exit code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("signal ") + ::strsignal(WTERMSIG(status));
  return "status " + std::to_string(status);
}

bool Alive(int64_t pid) {
  if (pid <= 0) return false;
  if (::kill(static_cast<pid_t>(pid), 0) != 0) return false;
  // A zombie is dead for our purposes.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  const size_t paren = line.rfind(')');
  return paren == std::string::npos || paren + 2 >= line.size() || line[paren + 2] != 'Z';
}

int64_t ReadPid(const std::string& path) {
  std::ifstream in(path);
  int64_t pid = 0;
  return (in >> pid) ? pid : 0;
}

// Waits up to `seconds` for child `pid` to exit; true when it did (or was already gone).
bool WaitChild(pid_t* pid, double seconds, int* status = nullptr) {
  if (*pid <= 0) return true;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (;;) {
    int st = 0;
    pid_t r = ::waitpid(*pid, &st, WNOHANG);
    if (r == *pid || (r < 0 && errno == ECHILD)) {
      if (status) *status = st;
      *pid = -1;
      return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace

Supervisor::Supervisor(Options options, std::string agent_bin)
    : o_(std::move(options)), agent_bin_(std::move(agent_bin)) {}

double Supervisor::Now() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

void Supervisor::Say(const std::string& line) const {
  if (!o_.quiet) std::fprintf(stderr, "memento-run [%7.2f s]: %s\n", Now(), line.c_str());
}

int Supervisor::NodeOfRank(const Attempt& a, int rank) const {
  const size_t pos = static_cast<size_t>(rank / o_.ranks_per_node);
  return pos < a.plan.ids.size() ? a.plan.ids[pos] : -1;
}

Status Supervisor::Prepare() {
  if (o_.job.empty()) o_.job = "run-" + std::to_string(::time(nullptr)) + "-" + std::to_string(::getpid());
  if (o_.work_dir.empty()) o_.work_dir = "/tmp/memento-run-" + o_.job;
  if (o_.timeline.empty()) o_.timeline = o_.work_dir + "/timeline.json";
  timeline_.job = o_.job;
  token_ = RandomToken();
  MEMENTO_RETURN_IF_ERROR(MakePrivateDir(o_.work_dir, "work directory"));
  if (o_.simulate_nodes > 0) {
    for (int i = 0; i < o_.simulate_nodes; ++i) plan_.ids.push_back(i);
    for (int i = 0; i < o_.spares; ++i) spare_ids_.push_back(o_.simulate_nodes + i);
    srun_ = o_.launcher == Launcher::kSrun;
  } else {
    MEMENTO_ASSIGN_OR_RETURN(all_hosts_, ReadHostfile(o_.hostfile));
    const int n = static_cast<int>(all_hosts_.size()) - o_.spares;
    if (n < 1) {
      return InvalidArgument("hostfile " + o_.hostfile + " lists " + std::to_string(all_hosts_.size()) +
                             " hosts: not enough for --spares " + std::to_string(o_.spares) + " and one training node");
    }
    for (int i = 0; i < n; ++i) {
      plan_.ids.push_back(i);
      plan_.hosts.push_back(all_hosts_[static_cast<size_t>(i)]);
    }
    for (int i = n; i < static_cast<int>(all_hosts_.size()); ++i) spare_ids_.push_back(i);
    srun_ = UsesSrun(o_, std::getenv("SLURM_JOB_ID") != nullptr);
  }
  heartbeat_host_ = "127.0.0.1";
  if (o_.simulate_nodes == 0) {
    char name[256] = {};
    ::gethostname(name, sizeof name - 1);
    heartbeat_host_ = name;
  }
  return Status::Ok();
}

pid_t Supervisor::Launch(const Command& c, const std::string& log_path) {
  std::fflush(stdout);
  std::fflush(stderr);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setpgid(0, 0);
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    for (const auto& [name, value] : c.env) ::setenv(name.c_str(), value.c_str(), 1);
    if (::geteuid() == 0) {
      // Containers often run as root; Open MPI refuses that unless told (memento-run's user did).
      ::setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
      ::setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
    }
    if (!log_path.empty()) {
      int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
    }
    std::vector<char*> argv;
    for (const std::string& a : c.argv) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "memento-run: cannot run %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  if (pid > 0) ::setpgid(pid, pid);
  return pid;
}

bool Supervisor::WaitAgentsUp(Attempt* a, Failure* failed) {
  const std::string node_dir = NodeDirPattern(o_.work_dir);
  const auto deadline = Clock::now() + std::chrono::duration<double>(o_.start_timeout_s);
  for (;;) {
    bool all = true;
    for (int id : a->plan.ids) {
      const std::string dir = ExpandNodePattern(node_dir, id);
      const int64_t pid = o_.simulate_nodes > 0 ? ReadPid(dir + "/agent.pid") : 1;
      if (pid <= 0) {
        all = false;
      } else {
        a->agent_pids[id] = pid;
      }
    }
    if (all) return true;
    int status = 0;
    if (WaitChild(&a->agents, 0, &status)) {
      failed->kind = "agent-exit";
      failed->detail = "the agents exited during start-up (" + ExitText(status) + "; see " + o_.work_dir + "/agents.log)";
      break;
    }
    if (Clock::now() >= deadline) {
      failed->kind = "agent-exit";
      failed->detail = "the agents did not serve within --start-timeout " + std::to_string(o_.start_timeout_s) +
                       " s (see " + o_.work_dir + "/agents.log)";
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  failed->happened_s = failed->detected_s = Now();
  return false;
}

void Supervisor::KillNode(Attempt* a, int node_id) {
  const std::string dir = ExpandNodePattern(NodeDirPattern(o_.work_dir), node_id);
  int64_t agent = a->agent_pids.count(node_id) ? a->agent_pids[node_id] : ReadPid(dir + "/agent.pid");
  if (agent > 0) ::kill(static_cast<pid_t>(agent), SIGKILL);
  for (const auto& [rank, seen] : a->ranks) {
    if (NodeOfRank(*a, rank) == node_id && seen.pid > 0) ::kill(static_cast<pid_t>(seen.pid), SIGKILL);
  }
  a->killed_nodes.push_back(node_id);
  // The node's memory and disk are gone: its slots and parity in shared memory, its catalog.
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  const std::string prefix = "memento-" + o_.job + "-n" + std::to_string(node_id) + "-";
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
    if (e.path().filename().string().rfind(prefix, 0) == 0) std::filesystem::remove(e.path(), ec);
  }
}

void Supervisor::Fire(Attempt* a, Injection* in, Failure* pending) {
  int64_t newest = -1;
  for (const auto& [r, seen] : a->ranks) newest = std::max(newest, seen.step);
  if (newest < 0 && recovering_ != nullptr) newest = recovering_->last_step;  // still recovering
  if (!pending->injected) {
    pending->injected = true;
    pending->kind = InjectionKindName(in->kind);
    pending->detail = in->spec;
    pending->happened_s = Now();
    pending->last_step = newest;
  } else {
    pending->detail += " + " + in->spec;
  }
  Say("drill " + in->spec + " fires (newest step " + std::to_string(newest) + ")");
  switch (in->kind) {
    case Injection::Kind::kNodeLoss:
      KillNode(a, in->target);
      break;
    case Injection::Kind::kAgentCrash: {
      const std::string dir = ExpandNodePattern(NodeDirPattern(o_.work_dir), in->target);
      int64_t pid = a->agent_pids.count(in->target) ? a->agent_pids[in->target] : ReadPid(dir + "/agent.pid");
      if (pid > 0) ::kill(static_cast<pid_t>(pid), SIGKILL);
      break;
    }
    case Injection::Kind::kRankCrash:
      ::kill(static_cast<pid_t>(a->ranks[in->target].pid), SIGKILL);
      break;
    case Injection::Kind::kHang:
      ::kill(static_cast<pid_t>(a->ranks[in->target].pid), SIGSTOP);
      a->stopped.push_back(a->ranks[in->target].pid);
      break;
  }
}

void Supervisor::HandleBeat(Attempt* a, const Beat& b, Failure* recovering, Failure* pending) {
  const int world = static_cast<int>(a->plan.ids.size()) * o_.ranks_per_node;
  if (b.rank >= world) return;
  RankSeen& r = a->ranks[b.rank];
  const double t = Now();
  r.pid = b.pid;
  r.last_beat = Clock::now();
  r.phase = b.phase;
  if (b.phase == BeatPhase::kWaiting && b.step >= 0) {
    if (r.waiting_step != b.step) r.waiting_since = r.last_beat;
    r.waiting_step = b.step;
  } else {
    r.waiting_step = -1;
  }
  switch (b.phase) {
    case BeatPhase::kRegistered:
      if (r.registered_s < 0) r.registered_s = t;
      break;
    case BeatPhase::kReady:
      if (r.ready_s < 0) r.ready_s = t;
      break;
    case BeatPhase::kRestored:
      r.restored_s = t;
      r.restored_step = b.step;
      r.source = b.detail;
      break;
    case BeatPhase::kStep:
      r.step = std::max(r.step, b.step);
      if (r.resumed_s < 0 && r.ready_s >= 0) r.resumed_s = t;
      break;
    default:
      break;
  }
  const int node = NodeOfRank(*a, b.rank);
  if (std::find(a->killed_nodes.begin(), a->killed_nodes.end(), node) != a->killed_nodes.end()) {
    ::kill(static_cast<pid_t>(b.pid), SIGKILL);  // a rank of a lost node that was not known yet
    return;
  }
  if (a->index >= 1 && b.phase == BeatPhase::kRegistered) {
    for (size_t i = 0; i < o_.injections.size(); ++i) {
      Injection& in = o_.injections[i];
      if (fired_[i] || !in.during_recovery) continue;
      fired_[i] = true;
      if (std::find(a->plan.ids.begin(), a->plan.ids.end(), in.target) == a->plan.ids.end()) {
        Say("drill " + in.spec + " skipped: node " + std::to_string(in.target) + " is not in the job any more");
        continue;
      }
      Fire(a, &in, pending);
    }
  }
  if (b.phase == BeatPhase::kStep) {
    // A rank drill fires along with another only once its rank has a pid to signal.
    auto rank_known = [a](int rank) {
      auto seen = a->ranks.find(rank);
      return seen != a->ranks.end() && seen->second.pid > 0;
    };
    for (size_t i : StepDrillsFired(o_.injections, fired_, b.rank, node, b.step, rank_known)) {
      fired_[i] = true;
      Fire(a, &o_.injections[i], pending);
    }
  }
  // The recovery is over when every rank has taken its first step after the restore.
  if (recovering != nullptr && recovering->resumed_after_s < 0 && static_cast<int>(a->ranks.size()) == world) {
    double registered = -1, ready = -1, restored = -1, resumed = -1;
    int64_t step = INT64_MAX;
    bool all = true;
    for (const auto& [rank, s] : a->ranks) {
      if (s.resumed_s < 0) all = false;
      registered = std::max(registered, s.registered_s);
      ready = std::max(ready, s.ready_s);
      restored = std::max(restored, s.restored_s);
      resumed = std::max(resumed, s.resumed_s);
      step = std::min(step, s.restored_step);
    }
    if (all) {
      recovering->registration_s = registered - a->training_launched_s;
      recovering->rebuild_s = ready - registered;
      recovering->restore_s = restored >= 0 ? restored - ready : -1;
      recovering->resumed_after_s = resumed - recovering->happened_s;
      recovering->restored_step = step == INT64_MAX ? -2 : step;
      // "memory", a checkpoint directory, or both joined by " + " (survivors from memory, the
      // ranks of a replaced node from storage).
      std::vector<std::string> sources;
      for (const auto& [rank, s] : a->ranks) {
        if (std::find(sources.begin(), sources.end(), s.source) == sources.end()) sources.push_back(s.source);
      }
      std::sort(sources.begin(), sources.end());
      recovering->source.clear();
      for (const std::string& src : sources) recovering->source += (recovering->source.empty() ? "" : " + ") + src;
      recovering->steps_lost = step >= 0 && recovering->last_step >= 0 ? recovering->last_step - step : -1;
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.2f s", recovering->resumed_after_s);
      Say("training resumed from step " + std::to_string(step) + " (" + recovering->source + "), " + buf +
          " after the failure");
    }
  }
}

void Supervisor::StopAll(Attempt* a, bool graceful) {
  if (graceful) {
    // Each agent stops in the same agreement round, then its launcher exits by itself.
    for (const auto& [id, pid] : a->agent_pids) ::kill(static_cast<pid_t>(pid), SIGTERM);
    const pid_t launcher = a->agents;
    if (!WaitChild(&a->agents, o_.stop_grace_s + 10)) {
      ::kill(-a->agents, SIGKILL);
      WaitChild(&a->agents, 10);
      if (!srun_) RemoveMpiSessionDir(launcher, MpiTmpdirBase());
    }
    return;
  }
  // The ranks get SIGTERM straight away (their launcher would wait before passing it on). The
  // agents get SIGKILL: their state is crash-safe (synced catalog, slots in shared memory), and
  // after a failure a graceful stop would wait for an agreement round that a lost peer never joins.
  for (int64_t pid : a->stopped) ::kill(static_cast<pid_t>(pid), SIGKILL);
  for (const auto& [rank, s] : a->ranks) {
    if (s.pid > 0) ::kill(static_cast<pid_t>(s.pid), SIGTERM);
  }
  for (const auto& [id, pid] : a->agent_pids) ::kill(static_cast<pid_t>(pid), SIGKILL);
  if (a->training > 0) ::kill(-a->training, SIGTERM);
  if (a->agents > 0) ::kill(-a->agents, SIGTERM);
  const auto deadline = Clock::now() + std::chrono::duration<double>(o_.stop_grace_s);
  while (Clock::now() < deadline && (a->training > 0 || a->agents > 0)) {
    WaitChild(&a->training, 0);
    WaitChild(&a->agents, 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  for (pid_t* job : {&a->training, &a->agents}) {
    if (*job > 0) {
      const pid_t launcher = *job;
      ::kill(-launcher, SIGKILL);
      WaitChild(job, 10);
      // A killed mpirun leaves its session directory: one per failure over a long job.
      if (!srun_) RemoveMpiSessionDir(launcher, MpiTmpdirBase());
    }
  }
  // Stragglers the launchers left behind: every rank and agent this attempt knew of.
  std::vector<int64_t> pids;
  for (const auto& [rank, s] : a->ranks) pids.push_back(s.pid);
  for (int id : a->plan.ids) {
    pids.push_back(ReadPid(ExpandNodePattern(NodeDirPattern(o_.work_dir), id) + "/agent.pid"));
  }
  for (const auto& [id, pid] : a->agent_pids) pids.push_back(pid);
  for (int64_t pid : pids) {
    if (Alive(pid)) ::kill(static_cast<pid_t>(pid), SIGKILL);
  }
  const auto gone = Clock::now() + std::chrono::seconds(5);
  for (int64_t pid : pids) {
    while (Alive(pid) && Clock::now() < gone) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::vector<int> Supervisor::FindLostNodes(const Attempt& a) {
  std::vector<int> lost;
  for (size_t i = 0; i < a.plan.ids.size(); ++i) {
    const int id = a.plan.ids[i];
    if (o_.simulate_nodes > 0) {
      struct stat st {};
      if (::stat(ExpandNodePattern(NodeDirPattern(o_.work_dir), id).c_str(), &st) != 0) lost.push_back(id);
      continue;
    }
    // A cluster host is lost when a trivial process cannot run there.
    NodePlan one;
    one.ids = {id};
    one.hosts = {a.plan.hosts[i]};
    Options probe_opts = o_;
    probe_opts.command = {"true"};
    Command probe = TrainingCommand(probe_opts, one, srun_, o_.work_dir, "", "", "none");
    probe.argv.insert(probe.argv.begin(), {"timeout", "30"});
    pid_t pid = Launch(probe, o_.work_dir + "/probe.log");
    int status = 0;
    WaitChild(&pid, 40, &status);
    if (pid > 0) {
      ::kill(-pid, SIGKILL);
      WaitChild(&pid, 5);
      status = 1 << 8;
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) lost.push_back(id);
  }
  return lost;
}

Supervisor::End Supervisor::RunAttempt(Attempt* a, Failure* recovering, Failure* failed) {
  const double t0 = Now();
  const std::string node_dir = NodeDirPattern(o_.work_dir);
  for (int id : a->plan.ids) {
    const std::string dir = ExpandNodePattern(node_dir, id);
    if (o_.simulate_nodes > 0) {
      Status st = MakePrivateDir(dir, "node directory");
      if (!st.ok()) std::fprintf(stderr, "memento-run: %s\n", st.ToString().c_str());  // the agent fails too
    }
    ::unlink((dir + "/agent.pid").c_str());
  }
  Command agents = AgentCommand(o_, a->plan, srun_, agent_bin_, o_.work_dir, token_, a->index);
  {
    std::ofstream log(o_.work_dir + "/agents.log", std::ios::app);
    log << "== memento-run attempt " << a->index << ": " << agents.ToString() << "\n";
  }
  Say("attempt " + std::to_string(a->index) + ": starting " + std::to_string(a->plan.ids.size()) + " agents: " +
      agents.ToString());
  a->agents = Launch(agents, o_.work_dir + "/agents.log");
  a->agents_launched_s = t0;
  if (!WaitAgentsUp(a, failed)) {
    StopAll(a, false);
    return a->index == 0 ? End::kFatal : End::kFailure;
  }
  a->agents_up_s = Now();
  if (recovering != nullptr) recovering->agent_restart_s = a->agents_up_s - t0;
  // A fresh listener (a new port) per attempt: late beats of the last attempt's processes go nowhere.
  beats_.reset();
  Result<std::unique_ptr<HeartbeatReceiver>> rx = HeartbeatReceiver::Create();
  if (!rx.ok()) {
    failed->kind = "launcher";
    failed->detail = "cannot listen for heartbeats: " + rx.status().message();
    failed->happened_s = failed->detected_s = Now();
    StopAll(a, false);
    return End::kFatal;
  }
  beats_ = std::move(rx).value();
  const std::string heartbeat = heartbeat_host_ + ":" + std::to_string(beats_->port());
  Command training = TrainingCommand(o_, a->plan, srun_, o_.work_dir, token_, heartbeat, "latest", a->index);
  Say("attempt " + std::to_string(a->index) + ": starting training: " + training.ToString());
  a->training = Launch(training, "");
  a->training_launched_s = Now();

  std::string detected;
  for (;;) {
    if (int sig = g_signal.load(); sig != 0) {
      failed->kind = "interrupted";
      failed->detail = std::string("memento-run received ") + ::strsignal(sig);
      failed->happened_s = failed->detected_s = Now();
      StopAll(a, false);
      return End::kFatal;
    }
    for (int wait_ms = 20;; wait_ms = 0) {
      Result<Beat> b = beats_->Receive(wait_ms);
      if (!b.ok()) {
        if (b.status().code() == StatusCode::kNotFound) break;
        continue;  // not a beat: ignore
      }
      if (b->job == o_.job) HandleBeat(a, *b, recovering, failed);
    }
    // Nothing to restore after a failure that came after training had made progress: stop, unless
    // the agents say nothing of the job was ever saved and no node's memory was lost (then the
    // training starts over and nothing saved is lost).
    if (recovering != nullptr && recovering->last_step >= 1) {
      for (const auto& [rank, s] : a->ranks) {
        const bool nothing_saved =
            recovering->lost_nodes.empty() && s.source.find(kNothingSaved) != std::string::npos;
        if (s.restored_step == -1 && !nothing_saved) {
          recovering->restored_step = -1;
          failed->kind = "unrecoverable";
          failed->detail = "rank " + std::to_string(rank) + " found no version to restore (" + s.source +
                           "); step " + std::to_string(recovering->last_step) + " had been reached";
          failed->happened_s = failed->detected_s = Now();
          StopAll(a, false);
          return End::kFatal;
        }
      }
    }
    int status = 0;
    // On simulated nodes every process is local: a rank or agent that died is seen at once, before
    // its launcher notices and ends its job.
    if (o_.simulate_nodes > 0) {
      // Several ranks may be gone by now (a launcher ends the whole job when one dies): name one
      // of a node that was just lost when there is one, else the lowest.
      int dead = -1;
      for (const auto& [rank, s] : a->ranks) {
        if (s.phase == BeatPhase::kClosed || s.pid <= 0 || Alive(s.pid)) continue;
        const bool lost = std::find(a->killed_nodes.begin(), a->killed_nodes.end(), NodeOfRank(*a, rank)) !=
                          a->killed_nodes.end();
        if (dead < 0 || lost) dead = rank;
        if (lost) break;
      }
      if (dead >= 0) {
        int others = 0;
        for (const auto& [rank, s] : a->ranks) {
          if (rank != dead && s.phase != BeatPhase::kClosed && s.pid > 0 && !Alive(s.pid)) ++others;
        }
        detected = "rank " + std::to_string(dead) + " (pid " + std::to_string(a->ranks[dead].pid) + ") died" +
                   (others > 0 ? " (and " + std::to_string(others) + " more)" : "");
        if (!failed->injected) failed->kind = "rank-exit";
      }
      for (const auto& [id, pid] : a->agent_pids) {
        if (detected.empty() && !Alive(pid)) {
          detected = "the agent of node " + std::to_string(id) + " (pid " + std::to_string(pid) + ") died";
          if (!failed->injected) failed->kind = "agent-exit";
        }
      }
    }
    if (!detected.empty()) {
      // reported below
    } else if (WaitChild(&a->training, 0, &status)) {
      if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        Say("training finished; stopping the agents");
        StopAll(a, true);
        return End::kSuccess;
      }
      detected = "the training job exited (" + ExitText(status) + ")";
      if (!failed->injected) failed->kind = "rank-exit";
    } else if (WaitChild(&a->agents, 0, &status)) {
      detected = "the agents' job exited (" + ExitText(status) + ")";
      if (!failed->injected) failed->kind = "agent-exit";
    } else if (o_.hang_timeout_s > 0) {
      // The hung rank is the one silent the longest: the others soon wait for it and fall silent too.
      // A rank whose snapshot waits for its agent beats while it waits, and the others wait for it
      // in their collectives: then the verdict is about that wait, which is a hang once it lasts
      // the timeout (its agent's log says what holds the slots).
      int hung = -1;
      double longest = 0;
      bool capture_wait = false;
      for (const auto& [rank, s] : a->ranks) {
        const double silent = std::chrono::duration<double>(Clock::now() - s.last_beat).count();
        if (s.waiting_step < 0 || s.phase != BeatPhase::kWaiting || silent > 2.0) continue;
        capture_wait = true;
        const double waited = std::chrono::duration<double>(Clock::now() - s.waiting_since).count();
        if (waited > o_.hang_timeout_s && waited > longest) {
          hung = rank;
          longest = waited;
        }
      }
      for (const auto& [rank, s] : a->ranks) {
        if (capture_wait) break;
        const double silent = std::chrono::duration<double>(Clock::now() - s.last_beat).count();
        if (s.phase != BeatPhase::kClosed && silent > o_.hang_timeout_s && silent > longest) {
          hung = rank;
          longest = silent;
        }
      }
      if (hung >= 0) {
        const RankSeen& s = a->ranks[hung];
        char buf[200];
        if (capture_wait) {
          std::snprintf(buf, sizeof buf,
                        "rank %d has waited %.1f s for its agent to take its snapshot of step %lld (no free slot: "
                        "see the agents' log)",
                        hung, longest, static_cast<long long>(s.waiting_step));
        } else {
          std::snprintf(buf, sizeof buf, "rank %d sent no heartbeat for %.1f s (last: %s, step %lld)", hung, longest,
                        BeatPhaseName(s.phase), static_cast<long long>(s.step));
        }
        detected = buf;
        std::string others;
        for (const auto& [rank, r] : a->ranks) {
          const double silent = std::chrono::duration<double>(Clock::now() - r.last_beat).count();
          if (rank != hung && r.phase != BeatPhase::kClosed && silent > o_.hang_timeout_s / 2) {
            others += (others.empty() ? "" : ", ") + std::to_string(rank);
          }
        }
        if (!others.empty()) detected += "; silent too: rank(s) " + others;
        if (!failed->injected) failed->kind = "hang";
      }
    }
    if (detected.empty()) continue;
    failed->detected_s = Now();
    if (failed->injected) {
      failed->detail += "; detected: " + detected;
    } else {
      failed->detail = detected;
      failed->happened_s = failed->detected_s;
      for (const auto& [r, s] : a->ranks) failed->last_step = std::max(failed->last_step, s.step);
      if (failed->last_step < 0 && recovering != nullptr) failed->last_step = recovering->last_step;
    }
    Say("failure: " + failed->detail + "; stopping both jobs");
    StopAll(a, false);
    failed->stop_s = Now() - failed->detected_s;
    failed->lost_nodes = FindLostNodes(*a);
    return End::kFailure;
  }
}

int Supervisor::Finish(int code, const std::string& outcome) {
  timeline_.exit_code = code;
  timeline_.outcome = outcome;
  timeline_.total_s = Now();
  std::fputs(FormatTimeline(timeline_).c_str(), stdout);
  const std::string tmp = o_.timeline + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << TimelineJson(timeline_);
  }
  if (std::rename(tmp.c_str(), o_.timeline.c_str()) != 0) {
    std::fprintf(stderr, "memento-run: cannot write the timeline %s: %s\n", o_.timeline.c_str(), std::strerror(errno));
  } else {
    std::printf("memento-run: timeline written to %s\n", o_.timeline.c_str());
  }
  if (code == 0 && o_.simulate_nodes > 0) {
    // The job is over: its simulated nodes' memory goes (the timeline and the agents' log stay).
    std::error_code ec;
    const std::string prefix = "memento-" + o_.job + "-";
    for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
      if (e.path().filename().string().rfind(prefix, 0) == 0) std::filesystem::remove(e.path(), ec);
    }
    for (int id : plan_.ids) std::filesystem::remove_all(ExpandNodePattern(NodeDirPattern(o_.work_dir), id), ec);
  }
  std::fflush(stdout);
  return code;
}

int Supervisor::Run() {
  start_ = Clock::now();
  if (Status st = Prepare(); !st.ok()) {
    std::fprintf(stderr, "memento-run: %s\n", st.message().c_str());
    return 2;
  }
  fired_.assign(o_.injections.size(), false);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGPIPE, SIG_IGN);
  for (int index = 0;; ++index) {
    Attempt a;
    a.index = index;
    a.plan = plan_;
    Failure failed;
    failed.attempt = index;
    Failure* recovering = timeline_.failures.empty() ? nullptr : &timeline_.failures.back();
    recovering_ = recovering;
    const End end = RunAttempt(&a, recovering, &failed);
    if (end == End::kSuccess) {
      return Finish(0, "training finished");
    }
    timeline_.failures.push_back(failed);
    if (end == End::kFatal) {
      return Finish(failed.kind == "interrupted" ? 130 : 1, "stopped: " + failed.detail);
    }
    Failure& f = timeline_.failures.back();
    for (int lost : f.lost_nodes) {
      if (spare_ids_.empty()) {
        return Finish(1, "stopped: node " + std::to_string(lost) + " was lost and no spare is left (--spares " +
                             std::to_string(o_.spares) + ")");
      }
      const int spare = spare_ids_.front();
      spare_ids_.erase(spare_ids_.begin());
      const size_t pos = static_cast<size_t>(std::find(plan_.ids.begin(), plan_.ids.end(), lost) - plan_.ids.begin());
      plan_.ids[pos] = spare;
      if (!plan_.hosts.empty()) plan_.hosts[pos] = all_hosts_[static_cast<size_t>(spare)];
      f.replacements.push_back(spare);
      Say("node " + std::to_string(lost) + " is lost; spare node " + std::to_string(spare) + " takes its place");
    }
    if (timeline_.restarts >= o_.max_restarts) {
      return Finish(1, "gave up: failure " + std::to_string(timeline_.failures.size()) + " (" + f.kind +
                           ") came after " + std::to_string(timeline_.restarts) + " restarts (--max-restarts " +
                           std::to_string(o_.max_restarts) + ")");
    }
    ++timeline_.restarts;
  }
}

}  // namespace memento::launcher
