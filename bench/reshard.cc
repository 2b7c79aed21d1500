// memento-bench reshard: a restart in another layout, restored from the agents' memory over NCCL
// against the same restart restored from storage.
//
// One agent, --ranks ranks (threads, rank r on GPU r). The job saves --bytes of fp32 state in
// --tensors tensors split by rows (TP rows) and flushes it; then it restarts split by columns, so
// each rank needs (ranks-1)/ranks of its bytes from the other ranks' slots:
//   1. memory: the same agent still holds the version; the ranks reshard it over NCCL;
//   2. storage, cold: a fresh agent loads the flushed checkpoint (--restore-from), its files
//      evicted from the page cache first (posix_fadvise DONTNEED);
//   3. storage, warm: the same with the files in the page cache.
// Each figure is the time from FinishRegistration() to the end of Restore() (the slowest rank):
// the agents' agreement, CRC verification and (storage) loading, then the copies to the GPUs.
// Limits in the same run: a parallel memcpy of the bytes (the packing the memory path does) and
// the storage restores (goal: memory ≥ 5× faster).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <thread>

#include "bench/harness.h"
#include "bench/subcommands.h"
#include "core/thread_pool.h"
#include "snapshot/client.h"

#ifdef MEMENTO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace memento::bench {
namespace {

constexpr const char* kUsage =
    "usage: memento-bench reshard [flags]\n"
    "  --bytes B        state of the job, all ranks (default 4G; K/M/G suffixes)\n"
    "  --ranks N        ranks, one per GPU (default: every GPU, at least 2)\n"
    "  --tensors T      fp32 tensors (default 8)\n"
    "  --storage DIR    checkpoint directory (default: a fresh one under /tmp)\n"
    "  --crc-threads N  passed to memento-agent (default: the agent's)\n"
    "  --json           end with one line of JSON holding every figure\n";

constexpr double kGoalSpeedup = 5;

struct Flags {
  uint64_t bytes = uint64_t{4} << 30;
  int ranks = 0;
  int tensors = 8;
  std::string storage;
  int crc_threads = 0;
  bool json = false;
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
    else if (n == "--json") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->json));
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

Result<std::unique_ptr<Client>> ConnectRank(const AgentProcess& agent, int rank, int world) {
  ClientOptions o;
  o.agent_socket = agent.socket_path();
  o.job_id = agent.job_id();
  o.rank = rank;
  o.local_rank = rank;
  o.world_size = world;
  o.node_id = 0;
  return Client::Connect(o);
}

// Runs fn(rank) in one thread per rank; the first error.
Status ForRanks(int n, const std::function<Status(int)>& fn) {
  std::vector<Status> st(n);
  std::vector<std::thread> ts;
  for (int r = 0; r < n; ++r) ts.emplace_back([&, r] { st[r] = fn(r); });
  for (auto& t : ts) t.join();
  for (int r = 0; r < n; ++r) {
    if (!st[r].ok()) return st[r].WithContext("rank " + std::to_string(r));
  }
  return Status::Ok();
}

struct Restart {
  double seconds = 0;          // FinishRegistration() to the end of Restore(), slowest rank
  double restore_seconds = 0;  // Restore() alone, slowest rank
  std::string source;
};

// A restart in the column layout against `agent`: every rank registers, restores, and closes.
Result<Restart> RestartInColumns(const Flags& f, const Shape& s, const AgentProcess& agent) {
  std::mutex mu;
  Restart out;
  MEMENTO_RETURN_IF_ERROR(ForRanks(f.ranks, [&](int r) -> Status {
    MEMENTO_ASSIGN_OR_RETURN(auto tensors, RankTensors::Make(f, s, r, 1, false));
    MEMENTO_ASSIGN_OR_RETURN(auto c, ConnectRank(agent, r, f.ranks));
    MEMENTO_RETURN_IF_ERROR(tensors->Register(c.get()));
    const auto t0 = Clock::now();
    MEMENTO_RETURN_IF_ERROR(c->FinishRegistration());
    const auto t1 = Clock::now();
    MEMENTO_ASSIGN_OR_RETURN(RestoreResult res, c->Restore());
    const auto t2 = Clock::now();
    std::lock_guard<std::mutex> lock(mu);
    out.seconds = std::max(out.seconds, Seconds(t0, t2));
    out.restore_seconds = std::max(out.restore_seconds, Seconds(t1, t2));
    out.source = res.source;
    return Status::Ok();
  }));
  return out;
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

  // 1. Save in rows, then restart in columns against the same agent: memory.
  AgentProcess::Options ao;
  ao.slots_per_rank = 3;
  ao.crc_threads = f.crc_threads;
  ao.log_level = "info";
  ao.extra_args = {"--storage", storage};
  auto agent = AgentProcess::Start(ao);
  if (!agent.ok()) return fail(agent.status(), nullptr);
  const std::string job = (*agent)->job_id();
  Status st = ForRanks(f.ranks, [&](int r) -> Status {
    MEMENTO_ASSIGN_OR_RETURN(auto tensors, RankTensors::Make(f, s, r, 0, true));
    MEMENTO_ASSIGN_OR_RETURN(auto c, ConnectRank(**agent, r, f.ranks));
    MEMENTO_RETURN_IF_ERROR(tensors->Register(c.get()));
    MEMENTO_RETURN_IF_ERROR(c->Snapshot(1));
    MEMENTO_RETURN_IF_ERROR(c->WaitUntilSafeToUpdate());
    return WaitPersisted(c.get(), 1);
  });
  if (!st.ok()) return fail(st, agent->get());
  auto memory = RestartInColumns(f, s, **agent);
  if (!memory.ok()) return fail(memory.status(), agent->get());
  agent->reset();

  // 2, 3. Fresh agents restore the flushed checkpoint: cold, then warm page cache.
  const std::string checkpoint = storage + "/" + job + "/step-1";
  std::vector<Restart> from_storage;
  for (bool cold : {true, false}) {
    if (cold) Evict(storage);
    AgentProcess::Options so = ao;
    so.extra_args = {"--storage", storage + "/restarted", "--restore-from", checkpoint};
    auto fresh = AgentProcess::Start(so);
    if (!fresh.ok()) return fail(fresh.status(), nullptr);
    auto r = RestartInColumns(f, s, **fresh);
    if (!r.ok()) return fail(r.status(), fresh->get());
    from_storage.push_back(*r);
  }
  if (f.storage.empty()) {
    std::filesystem::remove_all(storage);
    ForgetOnFatalSignal(storage);
  }

  const double cold_ratio = from_storage[0].seconds / memory->seconds;
  const double warm_ratio = from_storage[1].seconds / memory->seconds;
  std::printf("reshard: %d ranks (GPUs), %d tensors of [%lld, %lld] fp32 = %.2f GB; rows -> columns\n", f.ranks,
              f.tensors, static_cast<long long>(s.rows), static_cast<long long>(s.cols), bytes / 1e9);
  std::printf("  limit: memcpy of the bytes with %d threads          %8.3f s (%.2f GB/s)\n", threads, memcpy_seconds,
              GBps(bytes, memcpy_seconds));
  std::printf("  memory (NCCL):        %8.3f s, of which Restore() %8.3f s   [%s]\n", memory->seconds,
              memory->restore_seconds, memory->source.c_str());
  std::printf("  storage, cold cache:  %8.3f s, of which Restore() %8.3f s\n", from_storage[0].seconds,
              from_storage[0].restore_seconds);
  std::printf("  storage, warm cache:  %8.3f s, of which Restore() %8.3f s\n", from_storage[1].seconds,
              from_storage[1].restore_seconds);
  std::printf("  memory vs storage: %.1fx (cold), %.1fx (warm); goal >= %.0fx: %s\n", cold_ratio, warm_ratio,
              kGoalSpeedup, cold_ratio >= kGoalSpeedup ? "met" : "not met");
  std::printf("  memory restart vs memcpy of the bytes: %.2f\n", memcpy_seconds / memory->seconds);
  if (f.json) {
    JsonLine j;
    j.Add("bench", "reshard")
        .Add("ranks", f.ranks)
        .Add("bytes", bytes)
        .Add("memcpy_seconds", memcpy_seconds)
        .Add("memory_seconds", memory->seconds)
        .Add("memory_restore_seconds", memory->restore_seconds)
        .Add("storage_cold_seconds", from_storage[0].seconds)
        .Add("storage_warm_seconds", from_storage[1].seconds)
        .Add("speedup_cold", cold_ratio)
        .Add("speedup_warm", warm_ratio)
        .Add("ratio_to_memcpy", memcpy_seconds / memory->seconds)
        .Add("goal_met", cold_ratio >= kGoalSpeedup);
    std::printf("%s\n", j.str().c_str());
  }
  return memory->source.rfind("memory (resharded", 0) == 0 ? kExitOk : kExitFailed;
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
  return Run(f);
#else
  std::printf("reshard: skipped: this build has no CUDA\n");
  return kExitSkipped;
#endif
}

}  // namespace memento::bench
