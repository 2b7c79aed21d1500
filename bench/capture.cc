// memento-bench capture: how fast Snapshot() + WaitUntilSafeToUpdate() move the registered state
// into the agent's slots, as a fraction of the plain copy that bounds it (multi-threaded memcpy on
// the host path, pinned cudaMemcpyAsync D2H on the CUDA path), and how long the training loop
// stalls per snapshot when a compute phase that leaves the tensors alone overlaps the copy.
//
// Every timed capture starts with the agent idle: before it, the previous version is globally
// complete (checksummed and agreed), so neither the agent's CRC threads nor a wait for a free slot
// is counted in the capture (the time it takes is printed as "agent settle").
#include <sys/resource.h>

#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "bench/capture_source.h"
#include "bench/harness.h"
#include "bench/subcommands.h"
#include "core/shard.h"
#include "core/shared_memory.h"
#include "snapshot/client.h"

namespace memento::bench {
namespace {

constexpr const char* kUsage =
    "usage: memento-bench capture [flags]\n"
    "  --bytes B          total registered state, K/M/G suffixes (default 1G)\n"
    "  --tensors N        number of tensors of equal size (default 16)\n"
    "  --threads T        client copy threads, and threads of the memcpy limit (default 4)\n"
    "  --chunk B          bytes per copy task, client and limit alike (default 8M)\n"
    "  --iters N          timed iterations of each measurement (default 10)\n"
    "  --compute-ms MS    simulated compute phase between Snapshot() and WaitUntilSafeToUpdate()\n"
    "                     for the stall figure (default: 3x the measured copy time)\n"
    "  --cuda             capture a CUDA device buffer (limit: pinned cudaMemcpyAsync D2H)\n"
    "  --device N         CUDA device for --cuda (default 0)\n"
    "  --registration     also print the time until the slots are registered (and pinned) per GiB of slots\n"
    "                     (on the CUDA path: cudaHostRegister of the slots)\n"
    "  --memory-budget B  passed to memento-agent (default: none)\n"
    "  --crc-threads N    passed to memento-agent (default: the agent's, 4)\n"
    "  --json             end with one line of JSON holding every figure\n"
    "  --verbose          print every iteration's timings\n";

constexpr int kSlotsPerRank = 2;
constexpr int kWarmupIterations = 2;
constexpr int kSettleTimeoutMs = 120000;

struct CaptureFlags {
  uint64_t bytes = uint64_t{1} << 30;
  int tensors = 16;
  int threads = 4;
  uint64_t chunk_bytes = uint64_t{8} << 20;
  int iters = 10;
  double compute_ms = -1;  // < 0: 3x the measured copy time
  bool cuda = false;
  int device = 0;
  bool registration = false;
  uint64_t memory_budget_bytes = 0;
  int crc_threads = 0;
  bool json = false;
  bool verbose = false;
};

// Returns InvalidArgument for a bad command line; sets *help for --help.
Status ParseFlags(int argc, char** argv, CaptureFlags* f, bool* help) {
  FlagReader r(argc, argv);
  while (r.Next()) {
    const std::string& n = r.name();
    if (n == "--bytes") MEMENTO_RETURN_IF_ERROR(r.Bytes(&f->bytes));
    else if (n == "--tensors") MEMENTO_RETURN_IF_ERROR(r.Int(&f->tensors, 1));
    else if (n == "--threads") MEMENTO_RETURN_IF_ERROR(r.Int(&f->threads, 1));
    else if (n == "--chunk") MEMENTO_RETURN_IF_ERROR(r.Bytes(&f->chunk_bytes));
    else if (n == "--iters") MEMENTO_RETURN_IF_ERROR(r.Int(&f->iters, 1));
    else if (n == "--compute-ms") MEMENTO_RETURN_IF_ERROR(r.Double(&f->compute_ms, 0));
    else if (n == "--cuda") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->cuda));
    else if (n == "--device") MEMENTO_RETURN_IF_ERROR(r.Int(&f->device, 0));
    else if (n == "--registration") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->registration));
    else if (n == "--memory-budget") MEMENTO_RETURN_IF_ERROR(r.Bytes(&f->memory_budget_bytes));
    else if (n == "--crc-threads") MEMENTO_RETURN_IF_ERROR(r.Int(&f->crc_threads, 1));
    else if (n == "--json") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->json));
    else if (n == "--verbose") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->verbose));
    else if (n == "-h" || n == "--help") *help = true;
    else return r.Unknown();
  }
  if (static_cast<uint64_t>(f->tensors) > f->bytes) {
    return InvalidArgument("--tensors " + std::to_string(f->tensors) + " is more than --bytes " +
                           std::to_string(f->bytes));
  }
  return Status::Ok();
}

struct CaptureFigures {
  Samples limit;          // one plain copy of the state
  Samples capture;        // Snapshot() + WaitUntilSafeToUpdate(), back to back
  Samples capture_copy;   // of which until the last byte landed (CaptureStats::copy_seconds)
  Samples settle;         // after a capture, until the agent holds it globally complete
  Samples stall;          // time inside Snapshot() + WaitUntilSafeToUpdate() around the compute phase
  Samples stall_copy;     // the client's copy time (CaptureStats::copy_seconds) in the stall runs
  int copies_past_compute = 0;  // stall runs whose copy outlasted the compute phase
  double compute_ms = 0;
  double registration_seconds = 0;
  uint64_t slot_bytes = 0;
};

// Minor page faults of this process so far (every thread's).
long MinorFaults() {
  rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_minflt;
}

// Blocks until every version the agent holds is globally complete.
Status Settle(Client* client) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(kSettleTimeoutMs);
  for (;;) {
    MEMENTO_ASSIGN_OR_RETURN(std::vector<VersionInfo> versions, client->ListVersions());
    bool settled = true;
    std::string pending;
    for (const VersionInfo& v : versions) {
      if (v.state != "globally_complete") {
        settled = false;
        pending = "step " + std::to_string(v.step) + " is " + v.state;
      }
    }
    if (settled) return Status::Ok();
    if (Clock::now() >= deadline) {
      return Timeout("the agent did not complete the benchmark's versions within " +
                     std::to_string(kSettleTimeoutMs / 1000) + " s: " + pending);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

Status Measure(const CaptureFlags& flags, CaptureSource* source, CaptureFigures* fig) {
  AgentProcess::Options agent_options;
  agent_options.slots_per_rank = kSlotsPerRank;
  agent_options.memory_budget_bytes = flags.memory_budget_bytes;
  agent_options.crc_threads = flags.crc_threads;
  MEMENTO_ASSIGN_OR_RETURN(auto agent, AgentProcess::Start(agent_options));
  // On any error below, say what the agent said.
  auto with_agent_log = [&](const Status& st) {
    const std::string log = agent->LogTail(2000);
    return log.empty() ? st : Status(st.code(), st.message() + "\nmemento-agent's output:\n" + log, st.retryable());
  };

  ClientOptions copts;
  copts.agent_socket = agent->socket_path();
  copts.job_id = agent->job_id();
  copts.rank = 0;
  copts.local_rank = 0;
  copts.world_size = 1;
  copts.node_id = 0;
  copts.copy_threads = flags.threads;
  copts.copy_chunk_bytes = flags.chunk_bytes;
  auto connected = Client::Connect(copts);
  if (!connected.ok()) return with_agent_log(connected.status().WithContext("connecting to the benchmark's agent"));
  std::unique_ptr<Client> client = std::move(connected).value();

  for (const SourceTensor& t : source->tensors()) {
    Status st = client->RegisterTensor(t.name, t.data, t.bytes, DType::kU8, WholeTensor({static_cast<int64_t>(t.bytes)}),
                                       source->memory_kind(), source->cuda_device());
    if (!st.ok()) return with_agent_log(st);
  }
  auto t0 = Clock::now();
  if (Status st = client->FinishRegistration(); !st.ok()) return with_agent_log(st);
  // Pinning the slots (CUDA path) runs in the background after FinishRegistration(); the first
  // Snapshot() waits for it, so registration ends when that call returns.
  int64_t step = 0;
  if (Status st = client->Snapshot(step++); !st.ok()) return with_agent_log(st);
  fig->registration_seconds = Seconds(t0, Clock::now());
  fig->slot_bytes = uint64_t{kSlotsPerRank} * flags.bytes;
  if (Status st = client->WaitUntilSafeToUpdate(); !st.ok()) return with_agent_log(st);
  if (Status st = Settle(client.get()); !st.ok()) return with_agent_log(st);

  auto capture_once = [&](double compute_ms, double* seconds_in_client) -> Status {
    const auto a = Clock::now();
    MEMENTO_RETURN_IF_ERROR(client->Snapshot(step++));
    const auto b = Clock::now();
    if (compute_ms > 0) std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(compute_ms));
    const auto c = Clock::now();
    MEMENTO_RETURN_IF_ERROR(client->WaitUntilSafeToUpdate());
    *seconds_in_client = Seconds(a, b) + Seconds(c, Clock::now());
    return Status::Ok();
  };

  // Warm-up: first touches of the slots and of the limit's destination, thread start-up.
  Status st;
  for (int i = 0; i < kWarmupIterations && st.ok(); ++i) {
    double unused = 0;
    st = capture_once(0, &unused);
    if (st.ok()) st = Settle(client.get());
  }
  if (st.ok()) st = source->TimeLimitCopy().status();
  if (!st.ok()) return with_agent_log(st.WithContext("warm-up"));

  // 1 and 2: the limit and the capture, interleaved so that both see the same machine.
  for (int i = 0; i < flags.iters; ++i) {
    const long f0 = MinorFaults();
    auto limit = source->TimeLimitCopy();
    if (!limit.ok()) return limit.status();
    fig->limit.Add(*limit);
    const long f1 = MinorFaults();
    double seconds = 0;
    if (Status s = capture_once(0, &seconds); !s.ok()) return with_agent_log(s);
    const long f2 = MinorFaults();
    fig->capture.Add(seconds);
    fig->capture_copy.Add(client->last_capture().copy_seconds);
    const auto s0 = Clock::now();
    if (Status s = Settle(client.get()); !s.ok()) return with_agent_log(s);
    fig->settle.Add(Seconds(s0, Clock::now()));
    if (flags.verbose) {
      std::printf("  iteration %d: limit %.2f ms (%ld minor faults), capture %.2f ms (client copy %.2f ms, %ld minor "
                  "faults), settle %.2f ms\n",
                  i, *limit * 1e3, f1 - f0, seconds * 1e3, client->last_capture().copy_seconds * 1e3, f2 - f1,
                  Seconds(s0, Clock::now()) * 1e3);
    }
  }

  // 3: the stall around a compute phase that leaves the registered tensors alone.
  fig->compute_ms = flags.compute_ms >= 0 ? flags.compute_ms : 3 * fig->capture.Median() * 1e3;
  for (int i = 0; i < flags.iters; ++i) {
    double seconds = 0;
    if (Status s = capture_once(fig->compute_ms, &seconds); !s.ok()) return with_agent_log(s);
    fig->stall.Add(seconds);
    const double copy = client->last_capture().copy_seconds;
    fig->stall_copy.Add(copy);
    if (copy * 1e3 > fig->compute_ms) ++fig->copies_past_compute;
    if (flags.verbose) {
      const CaptureStats cs = client->last_capture();
      std::printf("  stall run %d: stall %.3f ms (in Snapshot %.3f ms, in Wait %.3f ms), client copy %.2f ms\n", i,
                  seconds * 1e3, cs.snapshot_call_seconds * 1e3, cs.wait_seconds * 1e3, copy * 1e3);
    }
    if (Status s = Settle(client.get()); !s.ok()) return with_agent_log(s);
  }
  client.reset();  // before the agent goes
  return Status::Ok();
}

void Report(const CaptureFlags& flags, const CaptureSource& source, const CaptureFigures& fig) {
  const double limit_gbps = GBps(flags.bytes, fig.limit.Median());
  const double capture_gbps = GBps(flags.bytes, fig.capture.Median());
  const double ratio = limit_gbps > 0 ? capture_gbps / limit_gbps : 0;
  const double copy_ms = fig.capture.Median() * 1e3;
  const double stall_ms = fig.stall.Median() * 1e3;
  const double stall_fraction = copy_ms > 0 ? stall_ms / copy_ms : 0;
  const double goal_stall = 0.05;
  const double gib = static_cast<double>(fig.slot_bytes) / 0x1p30;
  const std::string label = source.path() == "host" ? "memcpy (limit):" : "pinned D2H (limit):";

  std::printf("%-20s%7.2f GB/s   best %.2f GB/s\n", label.c_str(), limit_gbps, GBps(flags.bytes, fig.limit.Min()));
  std::printf("%-20s%7.2f GB/s   ratio %.2f of %s (goal >= %.1f)%s\n", "capture:", capture_gbps, ratio,
              source.limit_name().c_str(), source.goal_ratio(), ratio >= source.goal_ratio() ? "" : "   BELOW GOAL");
  std::printf("%-20s%7.1f ms     to the last byte in the slot, %.1f ms with the captured report (medians)\n", "",
              fig.capture_copy.Median() * 1e3, copy_ms);
  std::printf("%-20s%7.3f ms     %.3f of copy time %.1f ms (goal <= %.2f)%s\n", "stall:", stall_ms, stall_fraction,
              copy_ms, goal_stall, stall_fraction <= goal_stall ? "" : "   ABOVE GOAL");
  std::printf("%-20scompute phase %.1f ms; copy in the stall runs %.1f ms (median); %d of %d copies outlasted it\n",
              "", fig.compute_ms, fig.stall_copy.Median() * 1e3, fig.copies_past_compute, flags.iters);
  std::printf("%-20s%7.1f ms     until the version was globally complete (CRC + agreement), median\n",
              "agent settle:", fig.settle.Median() * 1e3);
  if (flags.registration) {
    std::printf("%-20s%7.3f s      for %s of slots: %.3f s per GiB%s\n", "registration:", fig.registration_seconds,
                FormatBytes(fig.slot_bytes).c_str(), fig.registration_seconds / gib,
                source.path() == "cuda" ? " (cudaHostRegister)" : "");
  }
  if (!flags.json) return;
  JsonLine j;
  j.Add("bench", "capture")
      .Add("path", source.path())
      .Add("ratio", ratio)
      .Add("limit", source.limit_name())
      .Add("limit_gbps", limit_gbps)
      .Add("limit_best_gbps", GBps(flags.bytes, fig.limit.Min()))
      .Add("capture_gbps", capture_gbps)
      .Add("capture_best_gbps", GBps(flags.bytes, fig.capture.Min()))
      .Add("capture_copy_ms", fig.capture_copy.Median() * 1e3)
      .Add("stall_ms", stall_ms)
      .Add("copy_ms", copy_ms)
      .Add("stall_fraction", stall_fraction)
      .Add("compute_ms", fig.compute_ms)
      .Add("copies_past_compute", fig.copies_past_compute)
      .Add("settle_ms", fig.settle.Median() * 1e3)
      .Add("bytes", flags.bytes)
      .Add("tensors", flags.tensors)
      .Add("threads", flags.threads)
      .Add("chunk_bytes", flags.chunk_bytes)
      .Add("iters", flags.iters)
      .Add("goal_ratio", source.goal_ratio())
      .Add("goal_stall_fraction", goal_stall);
  if (flags.registration) {
    j.Add("registration_s", fig.registration_seconds)
        .Add("slot_bytes", fig.slot_bytes)
        .Add("registration_s_per_gib", fig.registration_seconds / gib);
  }
  std::printf("%s\n", j.str().c_str());
}

}  // namespace

int CaptureMain(int argc, char** argv) {
  CaptureFlags flags;
  bool help = false;
  if (Status st = ParseFlags(argc, argv, &flags, &help); !st.ok()) {
    std::fprintf(stderr, "memento-bench capture: %s\n\n%s", st.message().c_str(), kUsage);
    return kExitUsage;
  }
  if (help) {
    std::printf("%s", kUsage);
    return kExitOk;
  }
  const std::string path = flags.cuda ? "cuda" : "host";

  auto made = flags.cuda ? MakeCudaSource(flags.bytes, flags.tensors, flags.device)
                         : MakeHostSource(flags.bytes, flags.tensors, flags.threads, flags.chunk_bytes);
  if (!made.ok()) {
    const Status& st = made.status();
    if (st.code() == StatusCode::kNotSupported) {
      if (BuiltWithCuda()) {
        std::printf("capture %s: skipped: %s\n", path.c_str(), st.message().c_str());
      } else {
        std::printf("capture %s: %s\n", path.c_str(), st.ToString().c_str());
      }
      if (flags.json) {
        std::printf("%s\n", JsonLine().Add("bench", "capture").Add("path", path).Add("skipped", true)
                                .Add("reason", st.ToString()).str().c_str());
      }
      return kExitSkipped;
    }
    std::fprintf(stderr, "memento-bench capture: %s\n", st.ToString().c_str());
    return st.code() == StatusCode::kInvalidArgument ? kExitUsage : kExitFailed;
  }
  std::unique_ptr<CaptureSource> source = std::move(made).value();

  const std::string copier =
      flags.cuda ? "GPU " + std::to_string(flags.device) : std::to_string(flags.threads) + " threads";
  std::printf("capture %s: %s in %d tensors, %s, %d iterations\n", path.c_str(), FormatBytes(flags.bytes).c_str(),
              flags.tensors, copier.c_str(), flags.iters);
  std::fflush(stdout);
  CaptureFigures figures;
  if (Status st = Measure(flags, source.get(), &figures); !st.ok()) {
    std::fprintf(stderr, "memento-bench capture: %s\n", st.ToString().c_str());
    return kExitFailed;
  }
  Report(flags, *source, figures);
  return kExitOk;
}

}  // namespace memento::bench
