// The shared pieces of memento-bench: flags, samples, JSON, buffers, the memcpy limit and the
// private agent process.
#include "bench/harness.h"

#include <sys/vfs.h>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "core/posix_error.h"

namespace memento::bench {

// ---- flags -----------------------------------------------------------------------------------

bool ParseByteSize(std::string_view text, uint64_t* out) {
  if (text.empty()) return false;
  std::string s(text);
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || !(v >= 0) || !std::isfinite(v)) return false;
  std::string_view suffix(end);
  double mult = 1;
  if (suffix == "K" || suffix == "k" || suffix == "KiB") mult = 0x1p10;
  else if (suffix == "M" || suffix == "m" || suffix == "MiB") mult = 0x1p20;
  else if (suffix == "G" || suffix == "g" || suffix == "GiB") mult = 0x1p30;
  else if (suffix == "T" || suffix == "t" || suffix == "TiB") mult = 0x1p40;
  else if (!suffix.empty() && suffix != "B") return false;
  const double bytes = v * mult;
  if (bytes >= 0x1p63) return false;
  *out = static_cast<uint64_t>(bytes);
  return true;
}

bool FlagReader::Next() {
  if (next_ == 0) next_ = 1;  // argv[0] is the subcommand
  if (next_ >= argc_) return false;
  std::string a = argv_[next_++];
  has_inline_value_ = false;
  inline_value_.clear();
  const size_t eq = a.find('=');
  if (a.rfind("--", 0) == 0 && eq != std::string::npos) {
    inline_value_ = a.substr(eq + 1);
    has_inline_value_ = true;
    a.resize(eq);
  }
  name_ = a;
  return true;
}

Status FlagReader::String(std::string* out) {
  if (has_inline_value_) {
    *out = inline_value_;
    return Status::Ok();
  }
  if (next_ >= argc_) return InvalidArgument(name_ + " needs a value");
  *out = argv_[next_++];
  return Status::Ok();
}

Status FlagReader::Bytes(uint64_t* out) {
  std::string v;
  MEMENTO_RETURN_IF_ERROR(String(&v));
  if (!ParseByteSize(v, out) || *out == 0) {
    return InvalidArgument(name_ + " expects a positive size like 256M or 1G, got '" + v + "'");
  }
  return Status::Ok();
}

Status FlagReader::Int(int* out, int min_value) {
  std::string v;
  MEMENTO_RETURN_IF_ERROR(String(&v));
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0 || x < min_value || x > 1 << 30) {
    return InvalidArgument(name_ + " expects an integer >= " + std::to_string(min_value) + ", got '" + v + "'");
  }
  *out = static_cast<int>(x);
  return Status::Ok();
}

Status FlagReader::Double(double* out, double min_value) {
  std::string v;
  MEMENTO_RETURN_IF_ERROR(String(&v));
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !std::isfinite(x) || x < min_value) {
    return InvalidArgument(name_ + " expects a number >= " + std::to_string(min_value) + ", got '" + v + "'");
  }
  *out = x;
  return Status::Ok();
}

Status FlagReader::Switch(bool* out) {
  if (has_inline_value_) return InvalidArgument(name_ + " takes no value");
  *out = true;
  return Status::Ok();
}

// ---- samples and JSON ------------------------------------------------------------------------

double Samples::Min() const { return v_.empty() ? 0 : *std::min_element(v_.begin(), v_.end()); }
double Samples::Max() const { return v_.empty() ? 0 : *std::max_element(v_.begin(), v_.end()); }

double Samples::Median() const {
  if (v_.empty()) return 0;
  std::vector<double> s = v_;
  std::sort(s.begin(), s.end());
  const size_t n = s.size();
  return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

void JsonLine::Key(std::string_view key) {
  if (!body_.empty()) body_ += ',';
  body_ += '"';
  body_ += key;
  body_ += "\":";
}

JsonLine& JsonLine::Add(std::string_view key, std::string_view value) {
  Key(key);
  body_ += '"';
  for (char c : value) {
    if (c == '"' || c == '\\') {
      body_ += '\\';
      body_ += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
      body_ += buf;
    } else {
      body_ += c;
    }
  }
  body_ += '"';
  return *this;
}

JsonLine& JsonLine::Add(std::string_view key, double value) {
  Key(key);
  if (!std::isfinite(value)) {
    body_ += "null";
  } else {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.6g", value);
    body_ += buf;
  }
  return *this;
}

JsonLine& JsonLine::Add(std::string_view key, int64_t value) {
  Key(key);
  body_ += std::to_string(value);
  return *this;
}

JsonLine& JsonLine::Add(std::string_view key, uint64_t value) {
  Key(key);
  body_ += std::to_string(value);
  return *this;
}

JsonLine& JsonLine::Add(std::string_view key, bool value) {
  Key(key);
  body_ += value ? "true" : "false";
  return *this;
}

JsonLine& JsonLine::Add(std::string_view key, const std::vector<double>& values) {
  Key(key);
  body_ += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) body_ += ',';
    if (!std::isfinite(values[i])) {
      body_ += "null";
    } else {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.6g", values[i]);
      body_ += buf;
    }
  }
  body_ += ']';
  return *this;
}

// ---- host memory and the memcpy limit --------------------------------------------------------

Result<std::unique_ptr<HostBuffer>> HostBuffer::Create(size_t bytes, uint8_t seed) {
  const size_t len = std::max<size_t>(bytes, 1);
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return PosixError("mmap of a " + std::to_string(bytes) + "-byte benchmark buffer");
  auto* data = static_cast<uint8_t*>(p);
  uint8_t pattern[4096];
  for (size_t i = 0; i < sizeof pattern; ++i) pattern[i] = static_cast<uint8_t>(seed + i * 131);
  for (size_t off = 0; off < bytes; off += sizeof pattern) {
    std::memcpy(data + off, pattern, std::min(sizeof pattern, bytes - off));
  }
  return std::unique_ptr<HostBuffer>(new HostBuffer(data, bytes));
}

HostBuffer::~HostBuffer() { ::munmap(data_, std::max<size_t>(size_, 1)); }

double ParallelMemcpy(ThreadPool* pool, const std::vector<CopyRegion>& regions, size_t chunk_bytes) {
  const auto t0 = Clock::now();
  TaskGroup group;
  for (const CopyRegion& r : regions) {
    for (size_t off = 0; off < r.bytes; off += chunk_bytes) {
      const size_t n = std::min(chunk_bytes, r.bytes - off);
      group.Add();
      pool->Submit([&group, dst = r.dst + off, src = r.src + off, n] {
        std::memcpy(dst, src, n);
        group.Done();
      });
    }
  }
  group.Wait();
  return Seconds(t0, Clock::now());
}

// ---- the agent process -----------------------------------------------------------------------

std::string ExecutableDir() {
  std::error_code ec;
  std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : exe.parent_path().string();
}

namespace {

// What a signal handler needs to clean up after the running agent, prepared in advance so that
// the handler calls only async-signal-safe functions (kill, waitpid, unlink, fork, execv).
struct EmergencyCleanup {
  static constexpr int kMaxPaths = 16;
  volatile sig_atomic_t armed = 0;
  volatile pid_t pid = -1;
  char shm_paths[kMaxPaths][256] = {};
  int shm_count = 0;
  char tmpdir[256] = {};
};
EmergencyCleanup g_cleanup;

// RemoveOnFatalSignal's paths: a slot is in use when its first byte is not NUL.
constexpr int kMaxExtraPaths = 8;
char g_extra_paths[kMaxExtraPaths][512] = {};

// rm -rf of `paths` (NULL-terminated), from a signal handler: fork, execv, waitpid only.
void RemoveFromHandler(char** paths) {
  if (paths[0] == nullptr) return;
  const pid_t rm = ::fork();
  if (rm == 0) {
    char arg0[] = "rm";
    char arg1[] = "-rf";
    char* argv[2 + kMaxExtraPaths + 1] = {arg0, arg1};
    int n = 2;
    for (int i = 0; paths[i] != nullptr; ++i) argv[n++] = paths[i];
    argv[n] = nullptr;
    ::execv("/bin/rm", argv);
    ::_exit(127);
  }
  if (rm > 0) ::waitpid(rm, nullptr, 0);
}

void OnFatalSignal(int sig) {
  if (g_cleanup.armed) {
    g_cleanup.armed = 0;
    if (g_cleanup.pid > 0) {
      ::kill(g_cleanup.pid, SIGTERM);
      ::waitpid(g_cleanup.pid, nullptr, 0);
    }
    for (int i = 0; i < g_cleanup.shm_count; ++i) ::unlink(g_cleanup.shm_paths[i]);
    if (g_cleanup.tmpdir[0] != '\0') {
      char* paths[] = {g_cleanup.tmpdir, nullptr};
      RemoveFromHandler(paths);
    }
  }
  char* extra[kMaxExtraPaths + 1] = {};
  int n = 0;
  for (int i = 0; i < kMaxExtraPaths; ++i) {
    if (g_extra_paths[i][0] != '\0') extra[n++] = g_extra_paths[i];
  }
  RemoveFromHandler(extra);
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

void InstallSignalCleanup() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  struct sigaction sa {};
  sa.sa_handler = OnFatalSignal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
}

void CopyInto(char* dst, size_t cap, const std::string& s) {
  std::snprintf(dst, cap, "%s", s.c_str());
}

// Shared memory and temporary directories of earlier benchmarks that were killed outright
// (SIGKILL leaves no chance to clean up): their names carry the benchmark's pid.
void SweepStale() {
  auto dead = [](const char* digits) {
    char* end = nullptr;
    const long pid = std::strtol(digits, &end, 10);
    if (end == digits || pid <= 0) return false;
    if (::kill(static_cast<pid_t>(pid), 0) != 0) return errno == ESRCH;
    // A zombie (not reaped yet) is dead too: "<pid> (<comm>) Z ...".
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    std::getline(stat, line);
    const size_t paren = line.rfind(')');
    return paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] == 'Z';
  };
  auto sweep = [&](const char* dir, const char* prefix, bool recursive) {
    DIR* d = ::opendir(dir);
    if (d == nullptr) return;
    const size_t n = std::strlen(prefix);
    while (dirent* e = ::readdir(d)) {
      if (std::strncmp(e->d_name, prefix, n) != 0 || !dead(e->d_name + n)) continue;
      std::error_code ec;
      const std::string path = std::string(dir) + "/" + e->d_name;
      if (recursive) std::filesystem::remove_all(path, ec);
      else ::unlink(path.c_str());
    }
    ::closedir(d);
  };
  sweep("/dev/shm", "memento-bench", false);
  sweep("/tmp", "memento-bench-", true);
}

}  // namespace

void RemoveOnFatalSignal(const std::string& path) {
  if (path.empty() || path.size() >= sizeof g_extra_paths[0]) return;
  InstallSignalCleanup();
  for (auto& slot : g_extra_paths) {
    if (slot[0] == '\0') {
      // Write the name first and its first byte last, so the handler never sees half a name.
      std::memcpy(slot + 1, path.c_str() + 1, path.size());
      std::atomic_signal_fence(std::memory_order_seq_cst);
      slot[0] = path[0];
      return;
    }
  }
}

void ForgetOnFatalSignal(const std::string& path) {
  for (auto& slot : g_extra_paths) {
    if (slot[0] != '\0' && path == slot) slot[0] = '\0';
  }
}

namespace {

std::string UniqueJobId() {
  std::random_device rd;
  char buf[64];
  std::snprintf(buf, sizeof buf, "bench%dx%08x", static_cast<int>(::getpid()), rd());
  return buf;
}

bool IsSocket(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

std::string DescribeWaitStatus(int ws) {
  if (WIFEXITED(ws)) return "exited with status " + std::to_string(WEXITSTATUS(ws));
  if (WIFSIGNALED(ws)) return std::string("was killed by signal ") + strsignal(WTERMSIG(ws));
  return "stopped";
}

}  // namespace

Result<std::unique_ptr<AgentProcess>> AgentProcess::Start(const Options& options) {
  std::unique_ptr<AgentProcess> agent(new AgentProcess());
  SweepStale();
  agent->job_id_ = UniqueJobId();
  std::string tmpl = "/tmp/memento-bench-" + std::to_string(::getpid()) + "-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) return PosixError("mkdtemp(" + tmpl + ")");
  agent->tmpdir_ = tmpl;
  agent->socket_path_ = agent->tmpdir_ + "/agent-0.sock";
  agent->log_path_ = agent->tmpdir_ + "/agent.log";

  InstallSignalCleanup();
  g_cleanup.shm_count = 0;
  for (int k = 0; k < std::min(options.slots_per_rank, EmergencyCleanup::kMaxPaths); ++k) {
    // The slot names of rank 0 on node 0 (agent/node_state.cc: ShmPrefix + "-r<rank>-s<k>").
    CopyInto(g_cleanup.shm_paths[g_cleanup.shm_count++], sizeof g_cleanup.shm_paths[0],
             "/dev/shm/memento-" + agent->job_id_ + "-n0-r0-s" + std::to_string(k));
  }
  CopyInto(g_cleanup.tmpdir, sizeof g_cleanup.tmpdir, agent->tmpdir_);
  g_cleanup.pid = -1;
  g_cleanup.armed = 1;

  const std::string binary =
      options.agent_binary.empty() ? ExecutableDir() + "/memento-agent" : options.agent_binary;
  if (::access(binary.c_str(), X_OK) != 0) {
    return PosixError("memento-agent binary " + binary).WithContext("starting the benchmark's agent");
  }
  std::vector<std::string> args = {binary,
                                   "--job", agent->job_id_,
                                   "--socket", agent->tmpdir_ + "/agent-%n.sock",
                                   "--catalog", agent->tmpdir_ + "/cat-%n",
                                   "--slots", std::to_string(options.slots_per_rank),
                                   "--log-level", options.log_level};
  if (options.crc_threads > 0) {
    args.push_back("--crc-threads");
    args.push_back(std::to_string(options.crc_threads));
  }
  if (options.memory_budget_bytes > 0) {
    args.push_back("--memory-budget");
    args.push_back(std::to_string(options.memory_budget_bytes));
  }
  args.insert(args.end(), options.extra_args.begin(), options.extra_args.end());

  // An MPI singleton first; if that dies before serving, under `mpirun -np 1`.
  Status direct = agent->Launch(args, /*under_mpirun=*/false);
  if (direct.ok()) direct = agent->WaitForSocket(options.start_timeout_ms);
  if (direct.ok()) return agent;
  if (agent->pid_ > 0) return direct;  // still running but not serving: mpirun would not help
  std::vector<std::string> mpi_args = {"mpirun", "--oversubscribe", "-np", "1"};
  mpi_args.insert(mpi_args.end(), args.begin(), args.end());
  Status under_mpirun = agent->Launch(mpi_args, /*under_mpirun=*/true);
  if (under_mpirun.ok()) under_mpirun = agent->WaitForSocket(options.start_timeout_ms);
  if (under_mpirun.ok()) return agent;
  return Status(under_mpirun.code(), "memento-agent did not start as an MPI singleton (" + direct.message() +
                                         ") nor under mpirun (" + under_mpirun.message() + ")");
}

Status AgentProcess::Launch(const std::vector<std::string>& argv, bool under_mpirun) {
  const int log_fd = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (log_fd < 0) return PosixError("opening agent log " + log_path_);
  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(log_fd);
    return PosixError("fork for memento-agent");
  }
  if (pid == 0) {
    // The agent must not outlive a benchmark that is killed outright.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(126);
    ::dup2(log_fd, STDOUT_FILENO);
    ::dup2(log_fd, STDERR_FILENO);
    const int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, STDIN_FILENO);
    if (under_mpirun) {
      ::setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
      ::setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
      ::execvp(cargv[0], cargv.data());
    } else {
      ::execv(cargv[0], cargv.data());
    }
    std::fprintf(stderr, "memento-bench: exec %s: %s\n", cargv[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(log_fd);
  pid_ = pid;
  g_cleanup.pid = pid;
  return Status::Ok();
}

Status AgentProcess::WaitForSocket(int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (IsSocket(socket_path_)) return Status::Ok();
    int ws = 0;
    const pid_t r = ::waitpid(pid_, &ws, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      g_cleanup.pid = -1;
      return Unavailable("memento-agent " + DescribeWaitStatus(ws) + " before serving " + socket_path_ +
                         "; its output:\n" + LogTail());
    }
    if (Clock::now() >= deadline) {
      return Timeout("memento-agent did not create " + socket_path_ + " within " + std::to_string(timeout_ms) +
                     " ms; its output:\n" + LogTail());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

std::string AgentProcess::LogTail(size_t max_bytes) const {
  std::ifstream in(log_path_, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  if (s.size() > max_bytes) s = "..." + s.substr(s.size() - max_bytes);
  return s;
}

void AgentProcess::Stop() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGTERM);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  for (;;) {
    const pid_t r = ::waitpid(pid_, nullptr, WNOHANG);
    if (r == pid_ || (r < 0 && errno != EINTR)) break;
    if (Clock::now() >= deadline) {
      std::fprintf(stderr, "memento-bench: memento-agent (pid %d) ignored SIGTERM for 10 s; killing it\n",
                   static_cast<int>(pid_));
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  pid_ = -1;
  g_cleanup.pid = -1;  // reaped: its pid may be reused
}

AgentProcess::~AgentProcess() {
  Stop();
  // MEMENTO_BENCH_AGENT_LOGS=DIR keeps each agent's log there (diagnostics; the bench's own runs
  // are otherwise silent).
  if (const char* keep = std::getenv("MEMENTO_BENCH_AGENT_LOGS"); keep != nullptr && *keep != '\0') {
    std::error_code ec;
    std::filesystem::create_directories(keep, ec);
    std::filesystem::copy_file(log_path_, std::string(keep) + "/agent-" + job_id_ + ".log",
                               std::filesystem::copy_options::overwrite_existing, ec);
  }
  // Every shared-memory segment of this job, whatever slots the agent made.
  const std::string prefix = "memento-" + job_id_ + "-";
  if (DIR* d = ::opendir("/dev/shm")) {
    while (dirent* e = ::readdir(d)) {
      if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) == 0) {
        ::unlink(("/dev/shm/" + std::string(e->d_name)).c_str());
      }
    }
    ::closedir(d);
  }
  std::error_code ec;
  std::filesystem::remove_all(tmpdir_, ec);
  g_cleanup.armed = 0;
}


std::string FileSystemName(const std::string& path) {
  struct statfs s {};
  if (::statfs(path.c_str(), &s) != 0) return "?";
  switch (static_cast<unsigned long>(s.f_type)) {
    case 0xEF53: return "ext4";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs";
    case 0x6969: return "nfs";
    case 0x65735546: return "fuse";
    case 0x0BD00BD0: return "lustre";
    case 0x47504653: return "gpfs";
    case 0x2FC12FC1: return "zfs";
    case 0x794C7630: return "overlayfs";
    default: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "0x%lx", static_cast<unsigned long>(s.f_type));
      return buf;
    }
  }
}

}  // namespace memento::bench
