// Test harness: real agents (memento-agent under mpirun, one process per simulated node, each
// with its own socket, catalog and shared memory), clients in threads or forked processes, and
// deterministic byte patterns. Used by the snapshot, agent and fault tests.
#pragma once

#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "snapshot/client.h"

namespace memento::testing {

// Where memento-agent lives: MEMENTO_BIN_DIR (e.g. a bundle on the GPU machine), else the build's.
inline std::string BinDir() {
  const char* b = std::getenv("MEMENTO_BIN_DIR");
  return b ? b : MEMENTO_BIN_DIR;
}

inline std::string TestTmp() {
  const char* t = std::getenv("MEMENTO_TEST_TMP");
  return t ? t : "/tmp";
}

// MEMENTO_TEST_TIME_SCALE (scripts/test-sanitizers sets 4): instrumented agents and clients run
// several times slower, so every wait below for what the agents do grows by this factor.
inline double TimeScale() {
  const char* v = std::getenv("MEMENTO_TEST_TIME_SCALE");
  const double s = v != nullptr ? std::atof(v) : 1.0;
  return s >= 1.0 ? s : 1.0;
}
inline int ScaledMs(int ms) { return static_cast<int>(ms * TimeScale()); }

// Polls `done` every 10 ms until it holds or ScaledMs(ms) have passed; returns its last answer.
inline bool WaitUntil(const std::function<bool()>& done, int ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ScaledMs(ms));
  for (;;) {
    if (done()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// A job id unique to this test run; mpi_run.sh removes everything named after its prefix.
inline std::string UniqueJob(const std::string& name) {
  static int counter = 0;
  const char* p = std::getenv("MEMENTO_TEST_PREFIX");
  return std::string(p ? p : "tlocal") + "-" + name + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

// Deterministic bytes for (seed): splitmix64 stream.
inline void FillPattern(void* p, size_t n, uint64_t seed) {
  uint8_t* b = static_cast<uint8_t*>(p);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; i += 8) {
    x += 0x9E3779B97F4A7C15ull;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    std::memcpy(b + i, &z, std::min<size_t>(8, n - i));
  }
}

inline uint64_t PatternSeed(int rank, int64_t step, int tensor) {
  return (static_cast<uint64_t>(rank) << 48) ^ (static_cast<uint64_t>(step) << 16) ^ static_cast<uint64_t>(tensor);
}

class AgentCluster {
 public:
  AgentCluster(std::string job, int nodes, std::vector<std::string> extra = {})
      : job_(std::move(job)), nodes_(nodes), extra_(std::move(extra)) {
    dir_ = TestTmp() + "/" + job_;
    ::mkdir(dir_.c_str(), 0700);
  }
  ~AgentCluster() {
    Kill();
    std::string cmd = "rm -rf '" + dir_ + "'/catalog-*; rm -f /dev/shm/memento-" + job_ + "-*";
    (void)std::system(cmd.c_str());
  }

  const std::string& job() const { return job_; }
  const std::string& Dir() const { return dir_; }
  // A node loss while the agents are down: its shared memory and catalog are deleted.
  void WipeNode(int n) const {
    std::string cmd = "rm -rf '" + CatalogDir(n) + "'; rm -f /dev/shm/memento-" + job_ + "-n" + std::to_string(n) + "-*";
    (void)std::system(cmd.c_str());
  }
  void SetExtraArgs(std::vector<std::string> extra) { extra_ = std::move(extra); }
  // The node id of each agent position (replacement nodes get new ids; --node-ids in the args).
  void SetNodeIds(std::vector<int> ids) { node_ids_ = std::move(ids); }
  std::string SocketPattern() const { return dir_ + "/agent-%n.sock"; }
  std::string Socket(int n) const { return dir_ + "/agent-" + std::to_string(n) + ".sock"; }
  std::string CatalogDir(int n) const { return dir_ + "/catalog-" + std::to_string(n); }
  std::string LogPath() const { return dir_ + "/agents.log"; }
  std::string Log() const {
    std::ifstream f(LogPath());
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }
  // Whether the agents' log holds `text`, waiting up to `wait_ms` (scaled) for it: mpirun forwards
  // the agents' output asynchronously, so a line logged before a reply can land in the file after it.
  bool LogHas(const std::string& text, int wait_ms = 10000) const {
    return WaitUntil([&] { return Log().find(text) != std::string::npos; }, wait_ms);
  }
  std::string SlotName(int node, int rank, int slot) const {
    return "/memento-" + job_ + "-n" + std::to_string(node) + "-r" + std::to_string(rank) + "-s" + std::to_string(slot);
  }

  // Starts the agents and waits until every socket accepts.
  void Start() {
    if (node_ids_.empty()) {
      for (int n = 0; n < nodes_; ++n) node_ids_.push_back(n);
    }
    for (int n : node_ids_) ::unlink(Socket(n).c_str());
    pid_ = ::fork();
    if (pid_ == 0) {
      ::setpgid(0, 0);
      int fd = ::open(LogPath().c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      std::vector<std::string> args = {"mpirun", "--oversubscribe", "-np", std::to_string(nodes_),
                                       BinDir() + "/memento-agent", "--job", job_,
                                       "--socket", SocketPattern(), "--catalog", dir_ + "/catalog-%n",
                                       "--crc-threads", "2"};
      for (const auto& e : extra_) args.push_back(e);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execvp("mpirun", argv.data());
      ::_exit(127);
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ScaledMs(30000));
    for (int n : node_ids_) {
      struct stat st {};
      while (::stat(Socket(n).c_str(), &st) != 0) {
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) == pid_) {
          pid_ = -1;
          FAIL() << "agents exited during start-up:\n" << Log();
        }
        if (std::chrono::steady_clock::now() > deadline) FAIL() << "agents did not start:\n" << Log();
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
  }

  // Waits up to `ms` (scaled) for the agents' job to end by itself (an agent died); true when it did.
  bool WaitExit(int ms) {
    return WaitUntil(
        [&] {
          int status = 0;
          if (pid_ > 0 && ::waitpid(pid_, &status, WNOHANG) == pid_) pid_ = -1;
          return pid_ <= 0;
        },
        ms);
  }

  // Graceful stop (SIGTERM: every agent stops in the same round).
  void Stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

  // A crash of every agent: SIGKILL, shared memory and catalogs stay.
  void Kill() {
    if (pid_ <= 0) return;
    ::kill(-pid_, SIGKILL);
    std::string cmd = "pkill -9 -f -- '--job " + job_ + " ' >/dev/null 2>&1";
    (void)std::system(cmd.c_str());
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

  Result<std::unique_ptr<Client>> Connect(int rank, int world, int node, int local_rank,
                                          const std::string& token = "", const std::string& job = "",
                                          int slot_timeout_ms = 0) const {
    ClientOptions o;
    o.agent_socket = SocketPattern();
    o.job_id = job.empty() ? job_ : job;
    o.job_token = token;
    o.rank = rank;
    o.world_size = world;
    o.node_id = node;
    o.local_rank = local_rank;
    o.copy_threads = 2;
    o.connect_timeout_ms = ScaledMs(5000);
    o.registration_timeout_ms = ScaledMs(60000);
    o.slot_timeout_ms = ScaledMs(slot_timeout_ms > 0 ? slot_timeout_ms : 60000);
    return Client::Connect(o);
  }

 private:
  std::string job_;
  int nodes_;
  std::vector<std::string> extra_;
  std::vector<int> node_ids_;
  std::string dir_;
  pid_t pid_ = -1;
};

// A rank's registered state: `n` float tensors of `elems` elements plus one blob. With `world` > 0
// each tensor is this rank's row block of a global [world * elems] tensor (what storage restores
// by global position); with 0 each rank's tensors are its own (memory restores by rank).
struct RankState {
  std::vector<std::vector<float>> tensors;
  std::string blob;
  size_t blob_size = 0;
  int world = 0;
  int rank = 0;

  RankState(int n, size_t elems, int world_size = 0, int my_rank = 0)
      : tensors(n, std::vector<float>(elems)), blob(256, '\0'), world(world_size), rank(my_rank) {}

  Status Register(Client* c) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const int64_t n = static_cast<int64_t>(tensors[i].size());
      ShardSpec spec = WholeTensor({n});
      if (world > 0) {
        auto split = SplitEvenly({n * world}, 0, world, rank);
        if (!split.ok()) return split.status();
        spec = *split;
      }
      Status st = c->RegisterTensor("t" + std::to_string(i), tensors[i].data(), DType::kF32, spec);
      if (!st.ok()) return st;
    }
    return c->RegisterBlob("cursor", blob.data(), blob.size(), &blob_size);
  }
  void Fill(int rank, int64_t step) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      FillPattern(tensors[i].data(), tensors[i].size() * 4, PatternSeed(rank, step, static_cast<int>(i)));
    }
    std::string c = "rank=" + std::to_string(rank) + " step=" + std::to_string(step);
    std::memcpy(blob.data(), c.data(), c.size());
    blob_size = c.size();
  }
  void Clear() {
    for (auto& t : tensors) std::fill(t.begin(), t.end(), 0.0f);
    std::fill(blob.begin(), blob.end(), '\0');
    blob_size = 0;
  }
  // True when the buffers hold exactly what Fill(rank, step) wrote.
  bool Matches(int rank, int64_t step) const {
    RankState expect(static_cast<int>(tensors.size()), tensors.empty() ? 0 : tensors[0].size(), world, this->rank);
    expect.Fill(rank, step);
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (std::memcmp(tensors[i].data(), expect.tensors[i].data(), tensors[i].size() * 4) != 0) return false;
    }
    return blob_size == expect.blob_size && std::memcmp(blob.data(), expect.blob.data(), blob_size) == 0;
  }
};

// Runs fn(rank) for ranks [0, n) in threads and joins them.
inline void RunRanks(int n, const std::function<void(int)>& fn) {
  std::vector<std::thread> ts;
  for (int r = 0; r < n; ++r) ts.emplace_back(fn, r);
  for (auto& t : ts) t.join();
}

// Runs fn in a forked child process; returns the raw wait status. The child exits 0 when fn
// returns, so a child that dies of SIGKILL shows WIFSIGNALED.
inline int RunInChild(const std::function<int()>& fn) {
  pid_t pid = ::fork();
  if (pid == 0) ::_exit(fn());
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

// Whether the client's node lists version `step` with `pred` true.
inline bool VersionShows(Client* c, int64_t step, const std::function<bool(const VersionInfo&)>& pred) {
  auto v = c->ListVersions();
  if (!v.ok()) return false;
  return std::any_of(v->begin(), v->end(), [&](const VersionInfo& x) { return x.step == step && pred(x); });
}

// Polls until version `step` is persisted (its checkpoint committed), up to 60 s (scaled).
inline bool WaitPersisted(Client* c, int64_t step) {
  return WaitUntil([&] { return VersionShows(c, step, [](const VersionInfo& x) { return x.persisted; }); }, 60000);
}

// Polls until version `step` shows a flush error on the client's node; returns it ("" on timeout).
inline std::string WaitFlushError(Client* c, int64_t step) {
  std::string error;
  WaitUntil(
      [&] {
        return VersionShows(c, step, [&](const VersionInfo& x) {
          error = x.flush_error;
          return !error.empty();
        });
      },
      60000);
  return error;
}

// Polls until version `step` is globally complete on the client's node, up to 30 s (scaled).
inline bool WaitGloballyComplete(Client* c, int64_t step) {
  return WaitUntil(
      [&] { return VersionShows(c, step, [](const VersionInfo& x) { return x.state == "globally_complete"; }); }, 30000);
}

// Polls until version `step` is erasure-coded (protected) on the client's node, up to 30 s (scaled).
inline bool WaitProtected(Client* c, int64_t step) {
  return WaitUntil([&] { return VersionShows(c, step, [](const VersionInfo& x) { return x.is_protected; }); }, 30000);
}

}  // namespace memento::testing
