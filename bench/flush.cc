// memento-bench flush: how fast the agent persists a version to storage, as a fraction of what
// `dd if=/dev/zero of=<dir>/dd.tmp bs=16M oflag=direct conv=fsync` of the same bytes reaches on the
// same directory in the same run, and whether flushing slows the training loop.
//
// 1. limit: dd (a child process, timed around fork..waitpid), without oflag=direct where the file
//    system refuses O_DIRECT (tmpfs), which the output then says;
// 2. flush: one rank, one agent with --storage; Snapshot(step) + WaitUntilSafeToUpdate(), then
//    from that return until ListVersions() reports the step persisted (CRC, agreement, the flush
//    order, the write, the manifest commit and the rounds between them);
// 3. writer: WriteRankFiles() of a slot-shaped host buffer into the same directory, in this
//    process: the library's writer alone, without the agent;
// 4. the step time of a simulated training loop (sleep, WaitUntilSafeToUpdate, Snapshot) with an
//    agent that does not flush and one that flushes every --flush-every steps, in alternation
//    (off, on, off, on); the two "off" runs give the noise.
// 1-3 are interleaved per iteration so that all three see the same machine; medians of --iters.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/capture_source.h"
#include "bench/harness.h"
#include "bench/subcommands.h"
#include "core/dtype.h"
#include "core/file_system.h"
#include "core/posix_error.h"
#include "core/shard.h"
#include "core/shared_memory.h"
#include "proto/memento.pb.h"
#include "proto/shard_convert.h"
#include "snapshot/client.h"
#include "ucp_format/native_checkpoint.h"

namespace memento::bench {
namespace {

constexpr const char* kUsage =
    "usage: memento-bench flush [flags]\n"
    "  --dir DIR          storage directory (default: a fresh directory under /tmp, removed at the end;\n"
    "                     in a given DIR only what the benchmark wrote is removed)\n"
    "  --bytes B          state of the one rank for the bandwidth figures, K/M/G suffixes (default 512M)\n"
    "  --tensors N        number of tensors of equal size (default 8)\n"
    "  --iters N          timed iterations of dd, flush and writer (default 3)\n"
    "  --steps N          steps of each simulated training run (default 40)\n"
    "  --compute-ms MS    simulated forward+backward per step (default 50)\n"
    "  --flush-every K    the agent flushes steps that are multiples of K in the 'on' runs (default 5)\n"
    "  --loop-bytes B     state of the rank in the training runs (default 256M)\n"
    "  --no-loop          skip the training-loop runs\n"
    "  --slots R          slots per rank of every agent (default 4, the agent's default when flushing)\n"
    "  --flush-bandwidth M  the 'on' agents' write-rate cap, MB/s (default: none)\n"
    "  --flush-piece B      the 'on' agents' --flush-piece (default: the agent's, 1M)\n"
    "  --keep K           checkpoints the bandwidth agent keeps (default: all of the run, so that no\n"
    "                     retention, which runs inside the commit, lands in a timed flush)\n"
    "  --json             end with one line of JSON holding every figure\n"
    "  --verbose          print every iteration's timings\n";

constexpr uint64_t kDdBlock = uint64_t{16} << 20;
constexpr int kWarmupIterations = 1;   // untimed flush + writer + dd before the timed ones
constexpr int kLoopWarmupSteps = 3;    // first steps of a training run left out of its mean
constexpr int kPollMicros = 1000;      // ListVersions() period while waiting for "persisted"
constexpr double kGoalRatio = 0.9;
constexpr int kSettleAfterRemoveMs = 100;  // pause after removing a written file (StorageDir::Remove)

struct FlushFlags {
  std::string dir;
  uint64_t bytes = uint64_t{512} << 20;
  int tensors = 8;
  int iters = 3;
  int steps = 40;
  double compute_ms = 50;
  int flush_every = 5;
  uint64_t loop_bytes = uint64_t{256} << 20;
  bool loop = true;
  int slots = 4;  // the agent's default when flushing (agent/agent.h)
  double flush_mbps = 0;  // the agent's --flush-bandwidth in the 'on' runs; 0 = none
  uint64_t flush_piece = 0;  // the agent's --flush-piece in the 'on' runs; 0 = its default
  int keep = 0;   // 0: every checkpoint of the bandwidth run
  bool json = false;
  bool verbose = false;
};

Status ParseFlags(int argc, char** argv, FlushFlags* f, bool* help) {
  FlagReader r(argc, argv);
  while (r.Next()) {
    const std::string& n = r.name();
    bool no_loop = false;
    if (n == "--dir") MEMENTO_RETURN_IF_ERROR(r.String(&f->dir));
    else if (n == "--bytes") MEMENTO_RETURN_IF_ERROR(r.Bytes(&f->bytes));
    else if (n == "--tensors") MEMENTO_RETURN_IF_ERROR(r.Int(&f->tensors, 1));
    else if (n == "--iters") MEMENTO_RETURN_IF_ERROR(r.Int(&f->iters, 1));
    else if (n == "--steps") MEMENTO_RETURN_IF_ERROR(r.Int(&f->steps, kLoopWarmupSteps + 1));
    else if (n == "--compute-ms") MEMENTO_RETURN_IF_ERROR(r.Double(&f->compute_ms, 0));
    else if (n == "--flush-every") MEMENTO_RETURN_IF_ERROR(r.Int(&f->flush_every, 1));
    else if (n == "--loop-bytes") MEMENTO_RETURN_IF_ERROR(r.Bytes(&f->loop_bytes));
    else if (n == "--no-loop") {
      MEMENTO_RETURN_IF_ERROR(r.Switch(&no_loop));
      f->loop = false;
    }
    else if (n == "--slots") MEMENTO_RETURN_IF_ERROR(r.Int(&f->slots, 2));
    else if (n == "--flush-bandwidth") MEMENTO_RETURN_IF_ERROR(r.Double(&f->flush_mbps, 0));
    else if (n == "--flush-piece") MEMENTO_RETURN_IF_ERROR(r.Bytes(&f->flush_piece));
    else if (n == "--keep") MEMENTO_RETURN_IF_ERROR(r.Int(&f->keep, 1));
    else if (n == "--json") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->json));
    else if (n == "--verbose") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->verbose));
    else if (n == "-h" || n == "--help") *help = true;
    else return r.Unknown();
  }
  for (uint64_t b : {f->bytes, f->loop_bytes}) {
    if (static_cast<uint64_t>(f->tensors) > b) {
      return InvalidArgument("--tensors " + std::to_string(f->tensors) + " is more than the bytes " + std::to_string(b));
    }
  }
  if (f->dir.size() > 400) return InvalidArgument("--dir: path longer than 400 characters");
  return Status::Ok();
}

// ---- the storage directory -------------------------------------------------------------------

// The directory every write of the benchmark goes to. A default one is made fresh under /tmp
// (named with this pid, so that AgentProcess's sweep removes it after a SIGKILL) and removed
// whole; in a given one, only the paths the benchmark made are removed. Also on SIGINT/SIGTERM.
class StorageDir {
 public:
  static Result<std::unique_ptr<StorageDir>> Open(const std::string& given) {
    std::unique_ptr<StorageDir> d(new StorageDir());
    if (given.empty()) {
      std::string tmpl = "/tmp/memento-bench-" + std::to_string(::getpid()) + "-flush-XXXXXX";
      if (::mkdtemp(tmpl.data()) == nullptr) return PosixError("mkdtemp(" + tmpl + ")");
      d->root_ = tmpl;
      d->owned_ = true;
      RemoveOnFatalSignal(d->root_);
      return d;
    }
    std::error_code ec;
    d->root_ = std::filesystem::absolute(given, ec).lexically_normal().string();
    if (ec) d->root_ = given;
    while (d->root_.size() > 1 && d->root_.back() == '/') d->root_.pop_back();
    struct stat st {};
    if (::stat(d->root_.c_str(), &st) != 0) {
      if (errno != ENOENT) return PosixError("stat(" + d->root_ + ")");
      if (::mkdir(d->root_.c_str(), 0700) != 0) return PosixError("mkdir(" + d->root_ + ")");
      d->owned_ = true;  // made here: removed whole
      RemoveOnFatalSignal(d->root_);
    } else if (!S_ISDIR(st.st_mode)) {
      return InvalidArgument("--dir " + d->root_ + " is not a directory");
    }
    return d;
  }

  ~StorageDir() {
    std::error_code ec;
    if (owned_) {
      std::filesystem::remove_all(root_, ec);
      ForgetOnFatalSignal(root_);
    }
    for (const std::string& p : made_) {
      std::filesystem::remove_all(p, ec);
      ForgetOnFatalSignal(p);
    }
  }
  StorageDir(const StorageDir&) = delete;
  StorageDir& operator=(const StorageDir&) = delete;

  const std::string& root() const { return root_; }
  // `name` inside the directory, removed at the end (and on a fatal signal) when not owned.
  std::string Track(const std::string& name) {
    const std::string p = root_ + "/" + name;
    if (!owned_ && std::find(made_.begin(), made_.end(), p) == made_.end()) {
      made_.push_back(p);
      RemoveOnFatalSignal(p);
    }
    return p;
  }
  // Removes a tracked path now (outside any timing), then lets the file system settle: syncfs
  // commits the removal (on a file system mounted with -o discard, that is when the freed blocks
  // are discarded) and a short pause lets the device finish, so that the next timed write does
  // not share the device with the trim of the last one.
  void Remove(const std::string& path) {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    const int fd = ::open(root_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
      ::syncfs(fd);
      ::close(fd);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(kSettleAfterRemoveMs));
  }

 private:
  StorageDir() = default;
  std::string root_;
  bool owned_ = false;
  std::vector<std::string> made_;
};


// ---- 1. the dd limit ---------------------------------------------------------------------------

struct DdRun {
  int exit_code = -1;      // dd's exit status; -1 when it did not exit normally
  double seconds = 0;      // fork .. waitpid
  std::string output;      // what dd printed (stderr and stdout)
};

// Runs `dd if=/dev/zero of=<path> bs=16M count=<count> [oflag=direct] conv=fsync`, timed from
// fork to waitpid with a steady clock; parses nothing.
Result<DdRun> RunDd(const std::string& path, uint64_t count, bool direct) {
  std::vector<std::string> args = {"dd", "if=/dev/zero", "of=" + path, "bs=16M", "count=" + std::to_string(count)};
  if (direct) args.push_back("oflag=direct");
  args.push_back("conv=fsync");
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) return PosixError("pipe for dd");
  const auto t0 = Clock::now();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(pipefd[0]);
    ::close(pipefd[1]);
    return PosixError("fork for dd");
  }
  if (pid == 0) {
    ::dup2(pipefd[1], STDOUT_FILENO);
    ::dup2(pipefd[1], STDERR_FILENO);
    ::execvp("dd", argv.data());
    std::fprintf(stderr, "exec dd: %s\n", std::strerror(errno));
    ::_exit(127);
  }
  ::close(pipefd[1]);
  int ws = 0;
  pid_t r;
  do r = ::waitpid(pid, &ws, 0); while (r < 0 && errno == EINTR);
  const auto t1 = Clock::now();
  DdRun run;
  run.seconds = Seconds(t0, t1);
  // dd prints three short lines: they fit in the pipe, so reading after waitpid cannot block it.
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(pipefd[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    run.output.append(buf, static_cast<size_t>(n));
  }
  ::close(pipefd[0]);
  if (r < 0) return PosixError("waitpid for dd");
  run.exit_code = WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
  return run;
}

// The limit: dd with oflag=direct, or without it where O_DIRECT is refused. Owns dd.tmp.
class DdLimit {
 public:
  DdLimit(StorageDir* dir, uint64_t bytes)
      : dir_(dir), path_(dir->Track("dd.tmp")), count_(std::max<uint64_t>(1, (bytes + kDdBlock - 1) / kDdBlock)) {}

  uint64_t bytes() const { return count_ * kDdBlock; }
  bool direct() const { return direct_; }
  std::string name() const { return direct_ ? "dd oflag=direct" : "dd conv=fsync (no O_DIRECT here)"; }

  // One timed run; the file is removed afterwards, outside the timing.
  Result<double> Once() {
    MEMENTO_ASSIGN_OR_RETURN(DdRun run, RunDd(path_, count_, direct_));
    if (run.exit_code != 0 && direct_ && run.output.find("Invalid argument") != std::string::npos) {
      // O_DIRECT refused (tmpfs on older kernels, some FUSE file systems): buffered + fsync.
      dir_->Remove(path_);
      direct_ = false;
      MEMENTO_ASSIGN_OR_RETURN(run, RunDd(path_, count_, direct_));
    }
    dir_->Remove(path_);
    if (run.exit_code != 0) {
      return IOError("dd of=" + path_ + " failed (" +
                     (run.exit_code < 0 ? std::string("killed") : "exit status " + std::to_string(run.exit_code)) +
                     "): " + run.output);
    }
    return run.seconds;
  }

 private:
  StorageDir* dir_;
  std::string path_;
  uint64_t count_;
  bool direct_ = true;
};

// ---- host tensors ------------------------------------------------------------------------------

struct HostTensors {
  std::vector<std::unique_ptr<HostBuffer>> buffers;
  std::vector<SourceTensor> tensors;
};

Result<HostTensors> MakeTensors(uint64_t bytes, int count) {
  HostTensors h;
  int i = 0;
  for (size_t n : SplitEqually(bytes, count)) {
    MEMENTO_ASSIGN_OR_RETURN(auto buf, HostBuffer::Create(n, static_cast<uint8_t>(i)));
    h.tensors.push_back({"t" + std::to_string(i), buf->data(), n});
    h.buffers.push_back(std::move(buf));
    ++i;
  }
  return h;
}

// A client of rank 0 (world 1) of `agent`'s job with `tensors` registered.
Result<std::unique_ptr<Client>> ConnectAndRegister(const AgentProcess& agent, const HostTensors& tensors) {
  ClientOptions copts;
  copts.agent_socket = agent.socket_path();
  copts.job_id = agent.job_id();
  copts.rank = 0;
  copts.local_rank = 0;
  copts.world_size = 1;
  copts.node_id = 0;
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Connect(copts));
  for (const SourceTensor& t : tensors.tensors) {
    MEMENTO_RETURN_IF_ERROR(client->RegisterTensor(t.name, t.data, t.bytes, DType::kU8,
                                                   WholeTensor({static_cast<int64_t>(t.bytes)})));
  }
  MEMENTO_RETURN_IF_ERROR(client->FinishRegistration());
  return client;
}

// Appends the agent's output to an error.
Status WithAgentLog(const AgentProcess& agent, const Status& st) {
  if (st.ok()) return st;
  const std::string log = agent.LogTail(2000);
  return log.empty() ? st : Status(st.code(), st.message() + "\nmemento-agent's output:\n" + log, st.retryable());
}

// The flusher's own timing of `step` from its log line
// "step <N>: <k> ranks written to <dir> (<size> in <seconds> s)"; < 0 when absent.
double AgentWriteSeconds(const std::string& log, int64_t step) {
  const std::string key = "step " + std::to_string(step) + ": ";
  for (size_t at = log.rfind(key); at != std::string::npos; at = at == 0 ? std::string::npos : log.rfind(key, at - 1)) {
    // Only at the start of the message, not inside another number ("step 12: " vs "step 2: ").
    if (at > 0 && std::isdigit(static_cast<unsigned char>(log[at - 1]))) continue;
    const size_t eol = log.find('\n', at);
    const std::string line = log.substr(at, eol == std::string::npos ? std::string::npos : eol - at);
    if (line.find(" ranks written to ") == std::string::npos) continue;
    const size_t in = line.rfind(" in ");
    if (in == std::string::npos) continue;
    char* end = nullptr;
    const double s = std::strtod(line.c_str() + in + 4, &end);
    if (end != line.c_str() + in + 4 && std::isfinite(s)) return s;
  }
  return -1;
}

int CountOccurrences(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}

// ---- 2 and 3. flush through the agent, and the writer alone ------------------------------------

struct FlushFigures {
  std::string fs;
  std::string limit_name;
  uint64_t dd_bytes = 0;
  uint64_t data_bytes = 0;   // bytes of rank-0.data (the state plus alignment padding)
  Samples limit;             // dd
  Samples flush;             // WaitUntilSafeToUpdate() returned .. persisted
  Samples settle;            // .. globally complete (first poll that saw it)
  Samples agent_write;       // the flusher's own write time (its log), when found
  Samples rest;              // flush - settle - agent_write: orders, manifest, rounds, polling
  Samples writer;            // WriteRankFiles() alone
  // The training loop: mean step time (ms) of each run, in the order off, on, off, on.
  std::vector<double> step_ms_off, step_ms_on, step_max_ms_off, step_max_ms_on;
  std::vector<double> wait_ms_off, wait_ms_on;        // mean WaitUntilSafeToUpdate() time per run
  std::vector<double> capture_ms_off, capture_ms_on;  // mean capture time per run
  std::vector<double> flushes_on;  // checkpoints committed during (and right after) each "on" run
};

// The layout of one rank of `tensors` whole U8 tensors, each at a 4 KiB-aligned slot offset, as
// the agent lays out a slot (docs/agent.md).
proto::RankRecord SlotLayout(const std::vector<size_t>& sizes) {
  proto::RankRecord r;
  r.set_rank(0);
  r.set_world_size(1);
  uint64_t offset = 0;
  int i = 0;
  for (size_t n : sizes) {
    proto::TensorRecord* t = r.add_tensors();
    t->set_name("t" + std::to_string(i++));
    t->set_dtype(static_cast<int32_t>(DType::kU8));
    ToProto(WholeTensor({static_cast<int64_t>(n)}), t->mutable_spec());
    t->set_slot_offset(offset);
    t->set_bytes(n);
    offset += (std::max<uint64_t>(n, 1) + 4095) / 4096 * 4096;
  }
  r.set_slot_bytes(offset);
  return r;
}

Status MeasureBandwidth(const FlushFlags& flags, StorageDir* dir, FlushFigures* fig) {
  DdLimit dd(dir, flags.bytes);

  // The library's writer, over a slot-shaped host buffer.
  const proto::RankRecord layout = SlotLayout(SplitEqually(flags.bytes, flags.tensors));
  MEMENTO_ASSIGN_OR_RETURN(auto slot, HostBuffer::Create(layout.slot_bytes(), 0x5A));
  const std::string writer_root = dir->Track("memento-bench-writer");
  auto write_once = [&](int64_t step) -> Result<double> {
    RankImage image;
    image.rank = 0;
    image.world_size = 1;
    image.layout = &layout;
    image.slot = slot->data();
    const std::string step_dir = CheckpointDir(writer_root, "bench", step);
    const auto t0 = Clock::now();
    auto entry = WriteRankFiles(PosixFileSystem(), step_dir, "bench", step, image, PersistOptions{});
    const double s = Seconds(t0, Clock::now());
    if (!entry.ok()) return entry.status().WithContext("WriteRankFiles into " + step_dir);
    fig->data_bytes = entry->data_bytes();
    dir->Remove(step_dir);
    return s;
  };

  // The agent: by default it keeps every checkpoint of the run, so that no retention (removal of
  // older checkpoints, inside the commit) lands in a timed flush.
  AgentProcess::Options agent_options;
  agent_options.slots_per_rank = flags.slots;
  agent_options.log_level = "info";
  const int keep = flags.keep > 0 ? flags.keep : flags.iters + kWarmupIterations + 1;
  agent_options.extra_args = {"--storage", dir->root(), "--keep", std::to_string(keep)};
  MEMENTO_ASSIGN_OR_RETURN(auto agent, AgentProcess::Start(agent_options));
  dir->Track(agent->job_id());
  MEMENTO_ASSIGN_OR_RETURN(HostTensors tensors, MakeTensors(flags.bytes, flags.tensors));
  auto connected = ConnectAndRegister(*agent, tensors);
  if (!connected.ok()) return WithAgentLog(*agent, connected.status().WithContext("registering with the agent"));
  std::unique_ptr<Client> client = std::move(connected).value();

  const double timeout_s = 300 + static_cast<double>(flags.bytes) / 20e6;  // >= 20 MB/s
  auto flush_once = [&](int64_t step, double* settle_s) -> Result<double> {
    MEMENTO_RETURN_IF_ERROR(client->Snapshot(step));
    MEMENTO_RETURN_IF_ERROR(client->WaitUntilSafeToUpdate());
    const auto t0 = Clock::now();
    *settle_s = -1;
    for (;;) {
      MEMENTO_ASSIGN_OR_RETURN(std::vector<VersionInfo> versions, client->ListVersions());
      const auto now = Clock::now();
      const VersionInfo* v = nullptr;
      for (const VersionInfo& x : versions) {
        if (x.step == step) v = &x;
      }
      if (v == nullptr) return Internal("the agent no longer lists step " + std::to_string(step));
      if (!v->flush_error.empty()) {
        return IOError("the agent's flush of step " + std::to_string(step) + " failed: " + v->flush_error);
      }
      if (*settle_s < 0 && v->state == "globally_complete") *settle_s = Seconds(t0, now);
      if (v->persisted) return Seconds(t0, now);
      if (Seconds(t0, now) > timeout_s) {
        return Timeout("step " + std::to_string(step) + " was not persisted within " +
                       std::to_string(static_cast<int>(timeout_s)) + " s (it is " + v->state + ")");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(kPollMicros));
    }
  };

  int64_t step = 1;
  for (int i = -kWarmupIterations; i < flags.iters; ++i) {
    const bool timed = i >= 0;
    auto limit = dd.Once();
    if (!limit.ok()) return limit.status();
    double settle = 0;
    auto flush = flush_once(step, &settle);
    if (!flush.ok()) return WithAgentLog(*agent, flush.status());
    const double agent_write = AgentWriteSeconds(agent->LogTail(size_t{1} << 20), step);
    auto writer = write_once(step);
    if (!writer.ok()) return writer.status();
    if (flags.verbose) {
      std::printf("  %s %d: dd %.1f ms, flush %.1f ms (globally complete after %.1f ms, agent write %.1f ms), "
                  "writer %.1f ms\n",
                  timed ? "iteration" : "warm-up", timed ? i : -i - 1, *limit * 1e3, *flush * 1e3, settle * 1e3,
                  agent_write * 1e3, *writer * 1e3);
      std::fflush(stdout);
    }
    if (timed) {
      fig->limit.Add(*limit);
      fig->flush.Add(*flush);
      fig->settle.Add(settle);
      if (agent_write >= 0) {
        fig->agent_write.Add(agent_write);
        fig->rest.Add(*flush - settle - agent_write);
      }
      fig->writer.Add(*writer);
    }
    ++step;
  }
  fig->limit_name = dd.name();
  fig->dd_bytes = dd.bytes();
  client.reset();
  return Status::Ok();
}

// ---- 4. the training loop with flushing off and on ---------------------------------------------

struct LoopRun {
  double mean_ms = 0;
  double max_ms = 0;
  double wait_ms = 0;     // mean time WaitUntilSafeToUpdate() blocked
  double copy_ms = 0;     // mean capture time, Snapshot() .. last byte in the slot (slot wait included)
  int slow_steps = 0;     // steps that blocked in WaitUntilSafeToUpdate() for more than 1 ms
  int flushes = 0;
};

Result<LoopRun> RunLoop(const FlushFlags& flags, StorageDir* dir, const HostTensors& tensors, bool flushing) {
  AgentProcess::Options agent_options;
  agent_options.slots_per_rank = flags.slots;  // the same in both, so that only flushing differs
  if (flushing) {
    agent_options.log_level = "info";
    agent_options.extra_args = {"--storage", dir->root(), "--flush-every", std::to_string(flags.flush_every)};
    if (flags.flush_mbps > 0) {
      agent_options.extra_args.push_back("--flush-bandwidth");
      agent_options.extra_args.push_back(std::to_string(flags.flush_mbps));
    }
    if (flags.flush_piece > 0) {
      agent_options.extra_args.push_back("--flush-piece");
      agent_options.extra_args.push_back(std::to_string(flags.flush_piece));
    }
  }
  MEMENTO_ASSIGN_OR_RETURN(auto agent, AgentProcess::Start(agent_options));
  const std::string job_dir = flushing ? dir->Track(agent->job_id()) : "";
  auto connected = ConnectAndRegister(*agent, tensors);
  if (!connected.ok()) return WithAgentLog(*agent, connected.status().WithContext("registering with the agent"));
  std::unique_ptr<Client> client = std::move(connected).value();

  const auto compute = std::chrono::duration<double, std::milli>(flags.compute_ms);
  Samples steps;
  double sum = 0, wait_sum = 0, copy_sum = 0;
  int slow = 0;
  for (int64_t step = 1; step <= flags.steps; ++step) {
    const auto t0 = Clock::now();
    std::this_thread::sleep_for(compute);  // forward and backward
    if (Status st = client->WaitUntilSafeToUpdate(); !st.ok()) return WithAgentLog(*agent, st);
    // (the optimizer step would update the tensors here; the benchmark leaves them alone)
    if (Status st = client->Snapshot(step); !st.ok()) return WithAgentLog(*agent, st);
    const double s = Seconds(t0, Clock::now());
    if (step > kLoopWarmupSteps) {
      steps.Add(s);
      sum += s;
      // The capture waited for is the previous step's.
      const CaptureStats cs = client->last_capture();
      wait_sum += cs.wait_seconds;
      copy_sum += cs.copy_seconds;
      if (cs.wait_seconds > 1e-3) ++slow;
    }
  }
  if (Status st = client->WaitUntilSafeToUpdate(); !st.ok()) return WithAgentLog(*agent, st);
  client.reset();
  LoopRun run;
  run.mean_ms = sum / static_cast<double>(steps.size()) * 1e3;
  run.max_ms = steps.Max() * 1e3;
  run.wait_ms = wait_sum / static_cast<double>(steps.size()) * 1e3;
  run.copy_ms = copy_sum / static_cast<double>(steps.size()) * 1e3;
  run.slow_steps = slow;
  if (flushing) {
    agent->Shutdown();  // lets a flush in progress finish, so its log line is there
    run.flushes = CountOccurrences(agent->LogTail(size_t{1} << 22), " committed: ");
    dir->Remove(job_dir);
  }
  return run;
}

Status MeasureLoop(const FlushFlags& flags, StorageDir* dir, FlushFigures* fig) {
  MEMENTO_ASSIGN_OR_RETURN(HostTensors tensors, MakeTensors(flags.loop_bytes, flags.tensors));
  for (int i = 0; i < 4; ++i) {
    const bool on = i % 2 == 1;
    MEMENTO_ASSIGN_OR_RETURN(LoopRun run, RunLoop(flags, dir, tensors, on));
    if (flags.verbose) {
      std::printf("  training run %d (flushing %s): mean step %.2f ms, slowest %.2f ms; mean wait %.2f ms (%d steps "
                  "blocked > 1 ms), mean capture %.1f ms%s\n",
                  i, on ? "on" : "off", run.mean_ms, run.max_ms, run.wait_ms, run.slow_steps, run.copy_ms,
                  on ? (", " + std::to_string(run.flushes) + " checkpoints committed").c_str() : "");
      std::fflush(stdout);
    }
    (on ? fig->step_ms_on : fig->step_ms_off).push_back(run.mean_ms);
    (on ? fig->step_max_ms_on : fig->step_max_ms_off).push_back(run.max_ms);
    (on ? fig->wait_ms_on : fig->wait_ms_off).push_back(run.wait_ms);
    (on ? fig->capture_ms_on : fig->capture_ms_off).push_back(run.copy_ms);
    if (on) fig->flushes_on.push_back(run.flushes);
  }
  return Status::Ok();
}

// ---- report -----------------------------------------------------------------------------------

double Mean(const std::vector<double>& v) {
  if (v.empty()) return NAN;
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

void Report(const FlushFlags& flags, const std::string& dir, const FlushFigures& fig) {
  const double limit_gbps = GBps(fig.dd_bytes, fig.limit.Median());
  const double flush_gbps = GBps(flags.bytes, fig.flush.Median());
  const double writer_gbps = GBps(flags.bytes, fig.writer.Median());
  const double ratio = limit_gbps > 0 ? flush_gbps / limit_gbps : 0;
  const double writer_ratio = limit_gbps > 0 ? writer_gbps / limit_gbps : 0;
  const double agent_write_ms = fig.agent_write.size() > 0 ? fig.agent_write.Median() * 1e3 : NAN;
  const double flush_ms = fig.flush.Median() * 1e3;
  const double settle_ms = fig.settle.Median() * 1e3;

  std::printf("%-22s%7.2f GB/s   best %.2f GB/s%s\n", (fig.limit_name + ":").c_str(), limit_gbps,
              GBps(fig.dd_bytes, fig.limit.Min()), fig.limit_name == "dd oflag=direct" ? "" : "   (O_DIRECT refused)");
  std::printf("%-22s%7.2f GB/s   ratio %.2f of dd (goal >= %.1f)%s\n", "flush (agent):", flush_gbps, ratio, kGoalRatio,
              ratio >= kGoalRatio ? "" : "   BELOW GOAL");
  std::printf("%-22s%7.1f ms     per flush (median): globally complete after %.1f ms, ", "", flush_ms, settle_ms);
  if (std::isfinite(agent_write_ms)) {
    std::printf("the flusher's write %.1f ms (%.2f GB/s), the rest (orders, manifest, rounds) %.1f ms\n",
                agent_write_ms, GBps(flags.bytes, agent_write_ms / 1e3), fig.rest.Median() * 1e3);
  } else {
    std::printf("the flusher's write time not found in its log\n");
  }
  std::printf("%-22s%7.2f GB/s   ratio %.2f of dd (WriteRankFiles in this process, %.1f ms)\n", "writer alone:",
              writer_gbps, writer_ratio, fig.writer.Median() * 1e3);

  double step_ratio = NAN, noise = NAN, mean_off = NAN, mean_on = NAN;
  if (flags.loop && fig.step_ms_off.size() == 2 && fig.step_ms_on.size() == 2) {
    mean_off = Mean(fig.step_ms_off);
    mean_on = Mean(fig.step_ms_on);
    step_ratio = mean_on / mean_off;
    noise = std::fabs(fig.step_ms_off[0] - fig.step_ms_off[1]) / mean_off;
    std::printf("%-22s%7.2f ms     %.2f / %.2f ms mean step (compute %.0f ms, %s state); noise %.2f%% between them\n",
                "step, flushing off:", mean_off, fig.step_ms_off[0], fig.step_ms_off[1], flags.compute_ms,
                FormatBytes(flags.loop_bytes).c_str(), noise * 100);
    std::printf("%-22s%7.2f ms     %.2f / %.2f ms; ratio %.4f of off (%+.2f%%, %s the noise); %.0f / %.0f checkpoints\n",
                "step, flushing on:", mean_on, fig.step_ms_on[0], fig.step_ms_on[1], step_ratio, (step_ratio - 1) * 100,
                std::fabs(step_ratio - 1) <= noise ? "within" : "beyond", fig.flushes_on[0], fig.flushes_on[1]);
    std::printf("%-22sslowest step off %.1f / %.1f ms, on %.1f / %.1f ms; blocked in WaitUntilSafeToUpdate() "
                "%.2f / %.2f ms off, %.2f / %.2f ms on per step\n",
                "", fig.step_max_ms_off[0], fig.step_max_ms_off[1], fig.step_max_ms_on[0], fig.step_max_ms_on[1],
                fig.wait_ms_off[0], fig.wait_ms_off[1], fig.wait_ms_on[0], fig.wait_ms_on[1]);
  }
  if (!flags.json) return;
  JsonLine j;
  j.Add("bench", "flush")
      .Add("ratio", ratio)
      .Add("limit", fig.limit_name)
      .Add("limit_gbps", limit_gbps)
      .Add("limit_best_gbps", GBps(fig.dd_bytes, fig.limit.Min()))
      .Add("flush_gbps", flush_gbps)
      .Add("flush_best_gbps", GBps(flags.bytes, fig.flush.Min()))
      .Add("writer_gbps", writer_gbps)
      .Add("writer_ratio", writer_ratio)
      .Add("flush_ms", flush_ms)
      .Add("settle_ms", settle_ms)
      .Add("agent_write_ms", agent_write_ms)
      .Add("writer_ms", fig.writer.Median() * 1e3)
      .Add("dd_ms", fig.limit.Median() * 1e3)
      .Add("bytes", flags.bytes)
      .Add("dd_bytes", fig.dd_bytes)
      .Add("data_bytes", fig.data_bytes)
      .Add("tensors", flags.tensors)
      .Add("iters", flags.iters)
      .Add("dir", dir)
      .Add("fs", fig.fs)
      .Add("step_ms_off", fig.step_ms_off)
      .Add("step_ms_on", fig.step_ms_on)
      .Add("step_max_ms_off", fig.step_max_ms_off)
      .Add("step_max_ms_on", fig.step_max_ms_on)
      .Add("step_ratio", step_ratio)
      .Add("noise", noise)
      .Add("wait_ms_off", fig.wait_ms_off)
      .Add("wait_ms_on", fig.wait_ms_on)
      .Add("capture_ms_off", fig.capture_ms_off)
      .Add("capture_ms_on", fig.capture_ms_on)
      .Add("flushes_on", fig.flushes_on)
      .Add("slots", flags.slots)
      .Add("keep", flags.keep)
      .Add("loop_bytes", flags.loop_bytes)
      .Add("steps", flags.steps)
      .Add("compute_ms", flags.compute_ms)
      .Add("flush_every", flags.flush_every)
      .Add("goal_ratio", kGoalRatio);
  std::printf("%s\n", j.str().c_str());
}

}  // namespace

int FlushMain(int argc, char** argv) {
  FlushFlags flags;
  bool help = false;
  if (Status st = ParseFlags(argc, argv, &flags, &help); !st.ok()) {
    std::fprintf(stderr, "memento-bench flush: %s\n\n%s", st.message().c_str(), kUsage);
    return kExitUsage;
  }
  if (help) {
    std::printf("%s", kUsage);
    return kExitOk;
  }
  auto opened = StorageDir::Open(flags.dir);
  if (!opened.ok()) {
    std::fprintf(stderr, "memento-bench flush: %s\n", opened.status().ToString().c_str());
    return kExitFailed;
  }
  std::unique_ptr<StorageDir> dir = std::move(opened).value();
  FlushFigures fig;
  fig.fs = FileSystemName(dir->root());
  std::printf("flush: %s in %d tensors to %s (%s), %d iterations", FormatBytes(flags.bytes).c_str(), flags.tensors,
              dir->root().c_str(), fig.fs.c_str(), flags.iters);
  if (flags.loop) {
    std::printf("; training runs of %d steps, %s, %.0f ms compute, flushing every %d steps", flags.steps,
                FormatBytes(flags.loop_bytes).c_str(), flags.compute_ms, flags.flush_every);
  }
  std::printf("\n");
  std::fflush(stdout);
  Status st = MeasureBandwidth(flags, dir.get(), &fig);
  if (st.ok() && flags.loop) st = MeasureLoop(flags, dir.get(), &fig);
  if (!st.ok()) {
    std::fprintf(stderr, "memento-bench flush: %s\n", st.ToString().c_str());
    return kExitFailed;
  }
  Report(flags, dir->root(), fig);
  return kExitOk;
}

}  // namespace memento::bench
