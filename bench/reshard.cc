// memento-bench reshard: a restart in another layout, restored from the agents' memory over NCCL
// against the same restart restored from storage.
//
// One agent, --ranks ranks (processes, as a job runs them; rank r on GPU r). The job saves --bytes of fp32 state in
// --tensors tensors split by rows (TP rows) and flushes it; then it restarts split by columns, so
// each rank needs (ranks-1)/ranks of its bytes from the other ranks' slots:
//   1. memory: the same agent still holds the version; the ranks reshard it over NCCL;
//   2. storage, cold: a fresh agent loads the flushed checkpoint (--restore-from), its files
//      evicted from the page cache first (posix_fadvise DONTNEED);
//   3. storage, warm: the same with the files in the page cache.
// Each figure is the time from the first RegisterTensor() to the end of Restore() (the slowest
// rank): the registration, the agents' agreement, CRC verification and (storage) loading, then the
// copies to the GPUs.
// Limits in the same run: a parallel memcpy of the bytes (the packing the memory path does,
// against Restore() from memory) and the storage restarts (goal: the memory restart ≥ 5× faster).
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>

#include "bench/harness.h"
#include "bench/subcommands.h"
#include "core/thread_pool.h"
#include "snapshot/client.h"

#ifdef MEMENTO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

extern char** environ;

namespace memento::bench {
namespace {

constexpr const char* kUsage =
    "usage: memento-bench reshard [flags]\n"
    "  --bytes B        state of the job, all ranks (default 4G; K/M/G suffixes)\n"
    "  --ranks N        ranks, one per GPU (default: every GPU, at least 2)\n"
    "  --tensors T      fp32 tensors (default 8)\n"
    "  --storage DIR    checkpoint directory (default: a fresh one under /tmp)\n"
    "  --crc-threads N  passed to memento-agent (default: the agent's)\n"
    "  --repeat N       restarts of each kind; medians (default 3)\n"
    "  --memory-only    only the memory restart (diagnostics; no ratios)\n"
    "  --json           end with one line of JSON holding every figure\n";

constexpr double kGoalSpeedup = 5;

struct Flags {
  uint64_t bytes = uint64_t{4} << 30;
  int ranks = 0;
  int tensors = 8;
  std::string storage;
  int crc_threads = 0;
  bool memory_only = false;
  bool json = false;
  int repeat = 3;
  // A rank's process (hidden flags, set by the benchmark for its workers).
  std::string worker;  // "save" or "restart"
  int rank = 0;
  std::string socket, job;
  bool verify = false;
};

Status ParseFlags(int argc, char** argv, Flags* f, bool* help) {
  FlagReader r(argc, argv);
  while (r.Next()) {
    const std::string& n = r.name();
    if (n == "--bytes") MEMENTO_RETURN_IF_ERROR(r.Bytes(&f->bytes));
    else if (n == "--ranks") MEMENTO_RETURN_IF_ERROR(r.Int(&f->ranks, 1));
    else if (n == "--tensors") MEMENTO_RETURN_IF_ERROR(r.Int(&f->tensors, 1));
    else if (n == "--storage") MEMENTO_RETURN_IF_ERROR(r.String(&f->storage));
    else if (n == "--crc-threads") MEMENTO_RETURN_IF_ERROR(r.Int(&f->crc_threads, 1));
    else if (n == "--repeat") MEMENTO_RETURN_IF_ERROR(r.Int(&f->repeat, 1));
    else if (n == "--json") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->json));
    else if (n == "--memory-only") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->memory_only));
    else if (n == "--worker") MEMENTO_RETURN_IF_ERROR(r.String(&f->worker));
    else if (n == "--rank") MEMENTO_RETURN_IF_ERROR(r.Int(&f->rank, 0));
    else if (n == "--socket") MEMENTO_RETURN_IF_ERROR(r.String(&f->socket));
    else if (n == "--job") MEMENTO_RETURN_IF_ERROR(r.String(&f->job));
    else if (n == "--verify") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->verify));
    else if (n == "-h" || n == "--help") *help = true;
    else return r.Unknown();
  }
  return Status::Ok();
}

#ifdef MEMENTO_WITH_CUDA

// The job's tensors: [rows, cols] fp32 each, rows and cols multiples of the rank count.
struct Shape {
  int64_t rows = 0, cols = 0;
};

Shape ShapeFor(const Flags& f) {
  const int64_t per_tensor = static_cast<int64_t>(f.bytes / 4 / static_cast<uint64_t>(f.tensors));
  Shape s;
  s.cols = 4096 / f.ranks * f.ranks;
  s.rows = std::max<int64_t>(f.ranks, per_tensor / s.cols / f.ranks * f.ranks);
  return s;
}

// One rank's device tensors in a layout: split along `dim` (0 = rows, 1 = columns).
struct RankTensors {
  int device = 0;
  std::vector<void*> ptrs;
  std::vector<ShardSpec> specs;
  uint64_t bytes = 0;

  static Result<std::unique_ptr<RankTensors>> Make(const Flags& f, const Shape& s, int rank, int dim, bool fill) {
    auto t = std::make_unique<RankTensors>();
    t->device = rank;
    if (cudaSetDevice(rank) != cudaSuccess) return Internal("cudaSetDevice(" + std::to_string(rank) + ") failed");
    for (int i = 0; i < f.tensors; ++i) {
      MEMENTO_ASSIGN_OR_RETURN(ShardSpec spec, SplitEvenly({s.rows, s.cols}, dim, f.ranks, rank));
      const size_t n = static_cast<size_t>(spec.local_numel) * 4;
      void* p = nullptr;
      if (cudaMalloc(&p, n) != cudaSuccess) return ResourceExhausted("cudaMalloc of " + std::to_string(n) + " bytes");
      if (cudaMemset(p, fill ? 0x40 + rank + i : 0, n) != cudaSuccess) return Internal("cudaMemset failed");
      t->ptrs.push_back(p);
      t->specs.push_back(std::move(spec));
      t->bytes += n;
    }
    cudaDeviceSynchronize();
    return t;
  }
  ~RankTensors() {
    cudaSetDevice(device);
    for (void* p : ptrs) cudaFree(p);
  }
  Status Register(Client* c) const {
    for (size_t i = 0; i < ptrs.size(); ++i) {
      MEMENTO_RETURN_IF_ERROR(
          c->RegisterTensor("t" + std::to_string(i), ptrs[i], DType::kF32, specs[i], MemoryKind::kCuda, device));
    }
    return Status::Ok();
  }
};

Status WaitPersisted(Client* c, int64_t step) {
  const auto deadline = Clock::now() + std::chrono::minutes(10);
  while (Clock::now() < deadline) {
    MEMENTO_ASSIGN_OR_RETURN(auto versions, c->ListVersions());
    for (const VersionInfo& v : versions) {
      if (v.step == step && v.persisted) return Status::Ok();
      if (v.step == step && !v.flush_error.empty()) return Internal("flush of step 1 failed: " + v.flush_error);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return Timeout("step 1 was not persisted within 10 minutes");
}

// Progress on stderr (unbuffered), with the seconds since the benchmark started.
void Progress(const std::string& what) {
  static const auto start = Clock::now();
  std::fprintf(stderr, "reshard: [%7.2f s] %s\n", Seconds(start, Clock::now()), what.c_str());
}

struct Restart {
  double seconds = 0;          // the registration to the end of Restore(), slowest rank
  double restore_seconds = 0;  // Restore() alone, slowest rank
  std::string source;
};

// One rank of the job in its own process, as a job runs them (threads of one process would share
// an address space: one rank's slot mapping would hold up another's NCCL set-up).
// `memento-bench reshard --worker save|restart --rank R ...`: makes its tensors (rows to save,
// columns to restart), connects (and, saving, registers); says "ready" on stdout and waits for "go"
// on stdin, so that every rank starts at once; then saves step 1 and waits for its flush ("done"),
// or restarts: registers, FinishRegistration() and Restore(), timed, then (--verify) checks
// every restored byte ("result <restart s> <Restore() s> <source>"). "error <message>" on failure.
int Worker(const Flags& f) {
  auto say = [](const std::string& line) {
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  };
  auto fail = [&](const Status& st) {
    say("error " + st.ToString());
    return kExitFailed;
  };
  const Shape s = ShapeFor(f);
  const bool save = f.worker == "save";
  if (!save && f.worker != "restart") return fail(InvalidArgument("--worker " + f.worker));
  auto tensors = RankTensors::Make(f, s, f.rank, save ? 0 : 1, /*fill=*/save);
  if (!tensors.ok()) return fail(tensors.status());
  ClientOptions o;
  o.agent_socket = f.socket;
  o.job_id = f.job;
  o.rank = f.rank;
  o.local_rank = f.rank;
  o.world_size = f.ranks;
  o.node_id = 0;
  auto c = Client::Connect(o);
  if (!c.ok()) return fail(c.status());
  Status st;
  // A restart registers its tensors inside the timed window: a client may start work at the first
  // CUDA tensor (the resharding's set-up, on the handshake's hint).
  if (save) st = (*tensors)->Register(c->get());
  if (!st.ok()) return fail(st);
  say("ready");
  char go[16];
  if (std::fgets(go, sizeof go, stdin) == nullptr) return fail(Internal("the benchmark never said go"));
  if (save) {
    st = (*c)->Snapshot(1);
    if (st.ok()) st = (*c)->WaitUntilSafeToUpdate();
    if (st.ok()) st = WaitPersisted(c->get(), 1);
    if (!st.ok()) return fail(st);
    say("done");
    return kExitOk;
  }
  const auto t0 = Clock::now();
  st = (*tensors)->Register(c->get());
  if (st.ok()) st = (*c)->FinishRegistration();
  if (!st.ok()) return fail(st);
  const auto t1 = Clock::now();
  Result<RestoreResult> res = (*c)->Restore();
  const auto t2 = Clock::now();
  if (!res.ok() && res.status().code() != StatusCode::kNotFound) return fail(res.status());
  Progress("rank " + std::to_string(f.rank) + " registered in " + std::to_string(Seconds(t0, t1)) + " s, restored in " +
           std::to_string(Seconds(t1, t2)) + " s");
  if (res.ok() && f.verify) {
    // Column c of rows [k * rows / ranks, ...) came from old rank k: byte 0x40 + k + tensor.
    const int64_t cols = s.cols / f.ranks;
    std::vector<uint8_t> host(static_cast<size_t>(s.rows * cols) * 4);
    cudaSetDevice(f.rank);
    for (int i = 0; i < f.tensors; ++i) {
      if (cudaMemcpy(host.data(), (*tensors)->ptrs[i], host.size(), cudaMemcpyDeviceToHost) != cudaSuccess) {
        return fail(Internal("cudaMemcpy of the restored tensor failed"));
      }
      for (int64_t row = 0; row < s.rows; ++row) {
        const uint8_t want = static_cast<uint8_t>(0x40 + row / (s.rows / f.ranks) + i);
        const uint8_t* p = host.data() + row * cols * 4;
        if (p[0] != want || std::memcmp(p, p + 1, static_cast<size_t>(cols) * 4 - 1) != 0) {
          return fail(DataLoss("rank " + std::to_string(f.rank) + " tensor t" + std::to_string(i) + " row " +
                               std::to_string(row) + " does not hold old rank " +
                               std::to_string(row / (s.rows / f.ranks)) + "'s bytes"));
        }
      }
    }
  }
  char line[64];
  std::snprintf(line, sizeof line, "result %.6f %.6f ", Seconds(t0, t2), Seconds(t1, t2));
  say(line + (res.ok() ? res->source : std::string("nothing to restore")));
  return kExitOk;
}

// Runs the job's ranks as processes (Worker) against `agent`; each one's last line.
Result<std::vector<std::string>> RunRanks(const Flags& f, const AgentProcess& agent, const std::string& phase,
                                          bool verify) {
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) return Internal("cannot find this program (/proc/self/exe)");
  self[n] = '\0';
  struct Rank {
    pid_t pid = -1;
    FILE* to = nullptr;    // its stdin
    FILE* from = nullptr;  // its stdout
  };
  std::vector<Rank> ranks(static_cast<size_t>(f.ranks));
  auto finish = [&](Status st) -> Status {
    for (Rank& r : ranks) {
      if (r.to != nullptr) std::fclose(r.to);
      if (r.from != nullptr) std::fclose(r.from);
      r.to = r.from = nullptr;
      if (r.pid > 0) {
        if (!st.ok()) ::kill(r.pid, SIGKILL);
        int status = 0;
        ::waitpid(r.pid, &status, 0);
        if (st.ok() && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
          st = Internal("rank process " + std::to_string(r.pid) + " ended with status " + std::to_string(status));
        }
        r.pid = -1;
      }
    }
    return st;
  };
  for (int r = 0; r < f.ranks; ++r) {
    int in[2], out[2];
    if (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0) return finish(Internal("pipe failed"));
    std::vector<std::string> args = {self,       "reshard",     "--worker", phase,
                                     "--rank",   std::to_string(r), "--ranks", std::to_string(f.ranks),
                                     "--bytes",  std::to_string(f.bytes), "--tensors", std::to_string(f.tensors),
                                     "--socket", agent.socket_path(), "--job", agent.job_id()};
    if (verify) args.push_back("--verify");
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    pid_t pid = -1;
    const int e = posix_spawn(&pid, self, &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    ::close(in[0]);
    ::close(out[1]);
    ranks[r].to = ::fdopen(in[1], "w");
    ranks[r].from = ::fdopen(out[0], "r");
    if (e != 0) return finish(Internal("posix_spawn of a rank failed: " + std::string(std::strerror(e))));
    ranks[r].pid = pid;
  }
  auto read_line = [](FILE* from) {
    char buf[4096];
    if (std::fgets(buf, sizeof buf, from) == nullptr) return std::string("error the rank's process ended");
    std::string line(buf);
    while (!line.empty() && line.back() == '\n') line.pop_back();
    return line;
  };
  for (int r = 0; r < f.ranks; ++r) {
    const std::string line = read_line(ranks[r].from);
    if (line != "ready") return finish(Internal("rank " + std::to_string(r) + ": " + line));
  }
  for (Rank& r : ranks) {
    std::fputs("go\n", r.to);
    std::fflush(r.to);
  }
  std::vector<std::string> lines;
  for (int r = 0; r < f.ranks; ++r) {
    lines.push_back(read_line(ranks[r].from));
    if (lines.back().rfind("error", 0) == 0) return finish(Internal("rank " + std::to_string(r) + ": " + lines.back()));
  }
  MEMENTO_RETURN_IF_ERROR(finish(Status::Ok()));
  return lines;
}

// A restart in the column layout against `agent` (every rank registers, restores, and exits);
// with `verify`, each rank then checks every restored byte (after the timing).
Result<Restart> RestartInColumns(const Flags& f, const AgentProcess& agent, bool verify) {
  MEMENTO_ASSIGN_OR_RETURN(std::vector<std::string> lines, RunRanks(f, agent, "restart", verify));
  Restart out;
  for (const std::string& line : lines) {
    double total = 0, call = 0;
    int used = 0;
    if (std::sscanf(line.c_str(), "result %lf %lf %n", &total, &call, &used) != 2) {
      return Internal("a rank answered '" + line + "'");
    }
    out.seconds = std::max(out.seconds, total);
    out.restore_seconds = std::max(out.restore_seconds, call);
    out.source = line.substr(static_cast<size_t>(used));
  }
  return out;
}

// The median restart and, separately, the median Restore() (odd counts: a run's own figures).
Restart MedianOf(const std::vector<Restart>& runs) {
  Samples total, call;
  for (const Restart& r : runs) {
    total.Add(r.seconds);
    call.Add(r.restore_seconds);
  }
  Restart m = runs.front();
  m.seconds = total.Median();
  m.restore_seconds = call.Median();
  return m;
}

// Drops the page cache's copies of every file under `dir`.
void Evict(const std::string& dir) {
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    int fd = ::open(e.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}


int Run(const Flags& flags_in) {
  Flags f = flags_in;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("reshard: skipped: no CUDA device\n");
    return kExitSkipped;
  }
  if (f.ranks == 0) f.ranks = std::max(devices, 1);
  if (f.ranks > devices) {
    std::fprintf(stderr, "reshard: --ranks %d but this machine has %d GPUs\n", f.ranks, devices);
    return kExitUsage;
  }
  const Shape s = ShapeFor(f);
  const uint64_t bytes = static_cast<uint64_t>(s.rows) * s.cols * 4 * f.tensors;
  std::string storage = f.storage;
  if (storage.empty()) {
    storage = "/tmp/memento-bench-reshard-" + std::to_string(::getpid());
    RemoveOnFatalSignal(storage);
  }
  std::filesystem::create_directories(storage);
  auto fail = [&](const Status& st, const AgentProcess* agent) {
    std::fprintf(stderr, "reshard: %s\n", st.ToString().c_str());
    if (agent != nullptr) std::fprintf(stderr, "memento-agent's output:\n%s\n", agent->LogTail().c_str());
    if (f.storage.empty()) std::filesystem::remove_all(storage);
    return kExitFailed;
  };

  // The limit: a parallel memcpy of the same bytes (the memory path packs every byte once).
  const int threads = std::clamp(static_cast<int>(std::thread::hardware_concurrency()) / 2, 4, 16);
  double memcpy_seconds = 0;
  {
    const uint64_t probe = std::min<uint64_t>(bytes, uint64_t{2} << 30);
    auto a = HostBuffer::Create(probe, 1), b = HostBuffer::Create(probe, 2);
    if (!a.ok() || !b.ok()) return fail(a.ok() ? b.status() : a.status(), nullptr);
    ThreadPool pool(threads);
    Samples t;
    for (int i = 0; i < 3; ++i) t.Add(ParallelMemcpy(&pool, {{(*a)->data(), (*b)->data(), probe}}, size_t{4} << 20));
    memcpy_seconds = t.Median() * static_cast<double>(bytes) / static_cast<double>(probe);
  }

  Progress("memcpy limit measured; saving " + std::to_string(bytes) + " bytes in rows");
  // 1. Save in rows, then restart in columns against the same agent: memory. Each run is a fresh
  // agent, so that its restart creates the new layout's slots as the storage and baseline
  // restarts do (a later restart of the same layout would find them made).
  AgentProcess::Options ao;
  ao.slots_per_rank = 3;
  ao.crc_threads = f.crc_threads;
  const char* agent_log_level = std::getenv("MEMENTO_BENCH_AGENT_LOG_LEVEL");  // diagnostics
  ao.log_level = agent_log_level != nullptr ? agent_log_level : "info";
  std::string checkpoint;  // the first run's flushed step 1
  std::vector<Restart> memory_runs;
  for (int run = 0; run < f.repeat; ++run) {
    AgentProcess::Options mo = ao;
    const std::string dir = storage + "/saved-" + std::to_string(run);
    mo.extra_args = {"--storage", dir};
    auto agent = AgentProcess::Start(mo);
    if (!agent.ok()) return fail(agent.status(), nullptr);
    if (run == 0) checkpoint = dir + "/" + (*agent)->job_id() + "/step-1";
    auto saved = RunRanks(f, **agent, "save", /*verify=*/false);
    if (!saved.ok()) return fail(saved.status(), agent->get());
    Progress("step 1 persisted; restarting in columns from memory");
    auto r = RestartInColumns(f, **agent, /*verify=*/run == 0);
    if (!r.ok()) return fail(r.status(), agent->get());
    Progress("memory restart done: " + r->source);
    memory_runs.push_back(*r);
    if (run > 0) std::filesystem::remove_all(dir);
  }
  const Restart memory_median = MedianOf(memory_runs);
  const Restart* memory = &memory_median;
  if (f.memory_only) {
    std::printf("reshard: memory restart %.3f s, Restore() %.3f s (medians of %d)\n", memory->seconds,
                memory->restore_seconds, f.repeat);
    if (f.storage.empty()) std::filesystem::remove_all(storage);
    return kExitOk;
  }

  // 2, 3. Fresh agents restore the flushed checkpoint: cold, then warm page cache; 4. a fresh
  // agent with nothing to restore: what every restart costs (slots, agreement), the baseline.
  std::vector<Restart> from_storage;
  for (int kind = 0; kind < 3; ++kind) {
    std::vector<Restart> runs;
    for (int run = 0; run < f.repeat; ++run) {
      const bool cold = kind == 0;
      if (cold) Evict(storage);
      AgentProcess::Options so = ao;
      so.extra_args = {"--storage", storage + "/restarted-" + std::to_string(kind) + "-" + std::to_string(run)};
      if (kind < 2) {
        so.extra_args.push_back("--restore-from");
        so.extra_args.push_back(checkpoint);
      }
      auto fresh = AgentProcess::Start(so);
      if (!fresh.ok()) return fail(fresh.status(), nullptr);
      Progress(kind == 2 ? std::string("restarting in columns with nothing to restore")
                         : std::string("restarting in columns from storage, ") + (cold ? "cold" : "warm") + " page cache");
      auto r = RestartInColumns(f, **fresh, /*verify=*/kind == 0 && run == 0);
      if (!r.ok()) return fail(r.status(), fresh->get());
      runs.push_back(*r);
    }
    from_storage.push_back(MedianOf(runs));
  }
  if (f.storage.empty()) {
    std::filesystem::remove_all(storage);
    ForgetOnFatalSignal(storage);
  }

  // The goal compares whole restarts (what the job waits for, from the registration to the end of
  // Restore()): the memory restart's registration reuses the retired layout's empty slots and
  // can be cheaper than the baseline's, so "restart - baseline" no longer isolates the restore.
  const double base = from_storage[2].seconds;
  const double mem_net = memory->seconds - base, cold_net = from_storage[0].seconds - base,
               warm_net = from_storage[1].seconds - base;
  const double cold_ratio = from_storage[0].seconds / memory->seconds,
               warm_ratio = from_storage[1].seconds / memory->seconds;
  std::printf("reshard: %d ranks (GPUs), %d tensors of [%lld, %lld] fp32 = %.2f GB; rows -> columns\n", f.ranks,
              f.tensors, static_cast<long long>(s.rows), static_cast<long long>(s.cols), bytes / 1e9);
  std::printf("  limit: memcpy of the bytes with %d threads  %8.3f s (%.2f GB/s)\n", threads, memcpy_seconds,
              GBps(bytes, memcpy_seconds));
  std::printf("  restart (registration + Restore, slowest rank; medians of %d); restart - baseline in brackets\n",
              f.repeat);
  std::printf("  baseline, nothing to restore: %8.3f s\n", base);
  std::printf("  memory (NCCL):        restart %8.3f s (%+.3f s), Restore() %6.3f s  [%s]\n", memory->seconds, mem_net,
              memory->restore_seconds, memory->source.c_str());
  std::printf("  storage, cold cache:  restart %8.3f s (%+.3f s), Restore() %6.3f s\n", from_storage[0].seconds, cold_net,
              from_storage[0].restore_seconds);
  std::printf("  storage, warm cache:  restart %8.3f s (%+.3f s), Restore() %6.3f s\n", from_storage[1].seconds, warm_net,
              from_storage[1].restore_seconds);
  std::printf("  restart from memory vs storage: %.1fx (cold), %.1fx (warm); goal >= %.0fx: %s\n", cold_ratio,
              warm_ratio, kGoalSpeedup, cold_ratio >= kGoalSpeedup ? "met" : "not met");
  std::printf("  memory Restore() vs memcpy of the bytes: %.2f\n", memcpy_seconds / memory->restore_seconds);
  if (f.json) {
    JsonLine j;
    j.Add("bench", "reshard")
        .Add("ranks", f.ranks)
        .Add("bytes", bytes)
        .Add("repeat", f.repeat)
        .Add("memcpy_seconds", memcpy_seconds)
        .Add("baseline_restart_seconds", base)
        .Add("memory_restart_seconds", memory->seconds)
        .Add("memory_restore_call_seconds", memory->restore_seconds)
        .Add("storage_cold_restart_seconds", from_storage[0].seconds)
        .Add("storage_warm_restart_seconds", from_storage[1].seconds)
        .Add("memory_restore_seconds", mem_net)
        .Add("storage_cold_restore_seconds", cold_net)
        .Add("storage_warm_restore_seconds", warm_net)
        .Add("speedup_cold", cold_ratio)
        .Add("speedup_warm", warm_ratio)
        .Add("ratio_to_memcpy", memcpy_seconds / memory->restore_seconds)
        .Add("goal_met", cold_ratio >= kGoalSpeedup);
    std::printf("%s\n", j.str().c_str());
  }
  for (const Restart& r : memory_runs) {
    if (r.source.rfind("memory (resharded", 0) != 0) {
      std::fprintf(stderr, "reshard: a memory restart restored from '%s', not from memory\n", r.source.c_str());
      return kExitFailed;
    }
  }
  return kExitOk;
}

#endif  // MEMENTO_WITH_CUDA

}  // namespace

int ReshardMain(int argc, char** argv) {
  Flags f;
  bool help = false;
  Status st = ParseFlags(argc, argv, &f, &help);
  if (help) {
    std::printf("%s", kUsage);
    return kExitOk;
  }
  if (!st.ok()) {
    std::fprintf(stderr, "reshard: %s\n%s", st.message().c_str(), kUsage);
    return kExitUsage;
  }
#ifdef MEMENTO_WITH_CUDA
  if (!f.worker.empty()) return Worker(f);
  return Run(f);
#else
  std::printf("reshard: skipped: this build has no CUDA\n");
  return kExitSkipped;
#endif
}

}  // namespace memento::bench
