// memento-bench erasure: how fast a parity group erasure-codes its nodes' snapshots over MPI, as a
// ratio to the smaller of two limits measured in the same run, and how much faster a lost node is
// rebuilt from the survivors than restored from storage (DESIGN.md §5, §9; issue 4).
//
// Every MPI rank is one simulated node of one parity group of N = world size. Without
// OMPI_COMM_WORLD_SIZE in its environment the command re-executes itself as
// `mpirun --oversubscribe --bind-to none -np N <self> erasure --worker ...` and passes its output
// through. Each node holds --bytes of random data in two buffers of slightly different sizes (two
// ranks' slots); the group pads them to one length L (Allgather of the sizes, PaddedLength of the
// largest). Then, one untimed warm-up round and --iters timed ones, interleaved so that all see the
// same machine (each timing is the slowest rank's, between barriers; medians are reported):
//   isal     on every node at once, Codec::Encode (ISA-L ec_encode_data) of the node's own L padded
//            bytes as k segments of S = L / k into m parities, one thread: bytes of data per
//            second. The agent encodes on one thread, so this is the compute limit per node. (Also
//            rank 0 alone, while the others wait: the one-core figure without oversubscription.)
//   mpi_p2p  on every node at once, Communicator::Exchange around a ring (each node sends to the
//            next and receives from the previous) of the bytes one send-to-holders encode sends per
//            node, k * m messages of 8 MiB (the pipeline's window) per Exchange: bytes sent per
//            second per node.
//   partial  ParityGroup::Encode: partial parities combined by an XOR reduce-scatter.
//   holders  ParityGroup::EncodeToHolders: segments sent to the parity holders (the agent's default).
// ratio = the faster encoding's L per second per node / min(isal, mpi_p2p); goal >= 0.8.
// Then node 1 is lost: its data and parity are zeroed and ParityGroup::Rebuild({1}) (collective)
// restores them, by gathering the sources at node 1 and by a chain of partial decodes (alternating;
// the agent's way, the chain when k > 1, is the rebuild figure); the bytes are checked equal. The
// storage figure: node 1's data bytes, written untimed to a file in --dir through
// PosixFileSystem (O_DIRECT) and fsynced, read back timed with
// O_DIRECT preads of 16 MiB (buffered after POSIX_FADV_DONTNEED where O_DIRECT is refused, which
// the output then says). rebuild_speedup = storage time / rebuild time; goal >= 10.
#include <fcntl.h>
#include <mpi.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "agent/mpi_communicator.h"
#include "agent/parity_group.h"
#include "bench/harness.h"
#include "bench/subcommands.h"
#include "core/file_system.h"
#include "core/posix_error.h"
#include "core/shared_memory.h"
#include "erasure/codec.h"
#include "erasure/scheme.h"
#include "erasure/stripe.h"

namespace memento::bench {
namespace {

constexpr const char* kUsage =
    "usage: memento-bench erasure [flags]\n"
    "  --nodes N          nodes of the parity group = MPI ranks (default 4); under mpirun already,\n"
    "                     the world size decides\n"
    "  --scheme S         rs:<m> | xor | replicate:<r> (default rs:2)\n"
    "  --bytes B          data per node, K/M/G suffixes (default 256M)\n"
    "  --iters N          timed iterations of every figure (default 3; medians are reported)\n"
    "  --dir DIR          directory for the storage comparison (default: a fresh directory under\n"
    "                     /tmp, removed at the end; in a given DIR only the benchmark's file is removed)\n"
    "  --json             end with one line of JSON holding every figure\n"
    "  --verbose          print every iteration's timings\n"
    "Without OMPI_COMM_WORLD_SIZE in the environment it runs itself under\n"
    "`mpirun --oversubscribe --bind-to none -np N` (OMPI_ALLOW_RUN_AS_ROOT set).\n";

constexpr double kGoalRatio = 0.8;
constexpr double kGoalRebuildSpeedup = 10;
constexpr int kWarmupIterations = 1;
constexpr size_t kMessageBytes = size_t{8} << 20;   // the pipeline's window (agent/parity_group.cc)
constexpr size_t kReadChunk = size_t{16} << 20;      // storage reads
constexpr size_t kDirectAlign = 4096;
constexpr int kLostIndex = 1;                        // the group member that is "lost"

struct ErasureFlags {
  int nodes = 4;
  bool nodes_given = false;
  std::string scheme = "rs:2";
  uint64_t bytes = uint64_t{256} << 20;
  int iters = 3;
  std::string dir;
  bool json = false;
  bool verbose = false;
  bool worker = false;        // hidden: this process is one rank under mpirun
  std::string storage_file;   // hidden: the storage file's path, chosen (and removed) by the launcher
};

Status ParseFlags(int argc, char** argv, ErasureFlags* f, bool* help) {
  FlagReader r(argc, argv);
  while (r.Next()) {
    const std::string& n = r.name();
    if (n == "--nodes") {
      MEMENTO_RETURN_IF_ERROR(r.Int(&f->nodes, 2));
      f->nodes_given = true;
    } else if (n == "--scheme") MEMENTO_RETURN_IF_ERROR(r.String(&f->scheme));
    else if (n == "--bytes") MEMENTO_RETURN_IF_ERROR(r.Bytes(&f->bytes));
    else if (n == "--iters") MEMENTO_RETURN_IF_ERROR(r.Int(&f->iters, 1));
    else if (n == "--dir") MEMENTO_RETURN_IF_ERROR(r.String(&f->dir));
    else if (n == "--json") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->json));
    else if (n == "--verbose") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->verbose));
    else if (n == "--worker") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->worker));
    else if (n == "--storage-file") MEMENTO_RETURN_IF_ERROR(r.String(&f->storage_file));
    else if (n == "-h" || n == "--help") *help = true;
    else return r.Unknown();
  }
  MEMENTO_ASSIGN_OR_RETURN(Scheme scheme, Scheme::Parse(f->scheme));
  if (scheme.kind == Scheme::Kind::kNone) return InvalidArgument("--scheme none has nothing to encode");
  if (f->dir.size() > 400) return InvalidArgument("--dir: path longer than 400 characters");
  if (f->nodes > 256) return InvalidArgument("--nodes: at most 256");
  return Status::Ok();
}


// The directory of the storage comparison and the one file in it. A default directory is made
// fresh under /tmp and removed whole; a given directory that does not exist is made and removed;
// in an existing one only the file is removed. Also on SIGINT/SIGTERM/SIGHUP.
class StorageSpot {
 public:
  static Result<std::unique_ptr<StorageSpot>> Open(const std::string& given, const std::string& file_name) {
    std::unique_ptr<StorageSpot> s(new StorageSpot());
    if (given.empty()) {
      std::string tmpl = "/tmp/memento-bench-" + std::to_string(::getpid()) + "-erasure-XXXXXX";
      if (::mkdtemp(tmpl.data()) == nullptr) return PosixError("mkdtemp(" + tmpl + ")");
      s->dir_ = tmpl;
      s->owned_ = true;
    } else {
      std::error_code ec;
      s->dir_ = std::filesystem::absolute(given, ec).lexically_normal().string();
      if (ec) s->dir_ = given;
      while (s->dir_.size() > 1 && s->dir_.back() == '/') s->dir_.pop_back();
      struct stat st {};
      if (::stat(s->dir_.c_str(), &st) != 0) {
        if (errno != ENOENT) return PosixError("stat(" + s->dir_ + ")");
        if (::mkdir(s->dir_.c_str(), 0700) != 0) return PosixError("mkdir(" + s->dir_ + ")");
        s->owned_ = true;
      } else if (!S_ISDIR(st.st_mode)) {
        return InvalidArgument("--dir " + s->dir_ + " is not a directory");
      }
    }
    s->file_ = s->dir_ + "/" + file_name;
    RemoveOnFatalSignal(s->owned_ ? s->dir_ : s->file_);
    return s;
  }
  ~StorageSpot() {
    std::error_code ec;
    const std::string& p = owned_ ? dir_ : file_;
    std::filesystem::remove_all(p, ec);
    ForgetOnFatalSignal(p);
  }
  StorageSpot(const StorageSpot&) = delete;
  StorageSpot& operator=(const StorageSpot&) = delete;

  const std::string& dir() const { return dir_; }
  const std::string& file() const { return file_; }
  // What to remove when the process must end at once: the directory when it is ours, else the file.
  const std::string& removal() const { return owned_ ? dir_ : file_; }

 private:
  StorageSpot() = default;
  std::string dir_;
  std::string file_;
  bool owned_ = false;
};

// ---- the launcher: re-executes itself under mpirun ---------------------------------------------

bool UnderMpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(v) != nullptr) return true;
  }
  return false;
}

int Launch(const ErasureFlags& flags, int argc, char** argv) {
  std::error_code ec;
  const std::string self = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  if (ec) {
    std::fprintf(stderr, "memento-bench erasure: cannot find this executable: %s\n", ec.message().c_str());
    return kExitFailed;
  }
  // The launcher owns the storage file (and the default directory), so that it is removed even
  // when the ranks are killed.
  auto spot = StorageSpot::Open(flags.dir, "memento-bench-erasure-" + std::to_string(::getpid()) + ".data");
  if (!spot.ok()) {
    std::fprintf(stderr, "memento-bench erasure: %s\n", spot.status().ToString().c_str());
    return kExitFailed;
  }
  std::vector<std::string> args = {"mpirun", "--oversubscribe", "--bind-to", "none", "-np",
                                   std::to_string(flags.nodes), self, "erasure", "--worker",
                                   "--storage-file", (*spot)->file(), "--dir", (*spot)->dir()};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dir") {  // replaced above by the absolute directory
      ++i;
      continue;
    }
    if (a.rfind("--dir=", 0) == 0) continue;
    args.push_back(a);
  }
  std::vector<char*> cargv;
  for (std::string& a : args) cargv.push_back(a.data());
  cargv.push_back(nullptr);

  std::fflush(stdout);
  std::fflush(stderr);
  int errpipe[2];
  if (::pipe2(errpipe, O_CLOEXEC) != 0) {
    std::fprintf(stderr, "memento-bench erasure: pipe: %s\n", std::strerror(errno));
    return kExitFailed;
  }
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    std::fprintf(stderr, "memento-bench erasure: fork: %s\n", std::strerror(errno));
    return kExitFailed;
  }
  if (pid == 0) {
    ::close(errpipe[0]);
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // the ranks must not outlive a killed benchmark
    if (::getppid() != parent) ::_exit(126);
    ::setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    ::setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    ::execvp(cargv[0], cargv.data());
    const int err = errno;
    (void)!::write(errpipe[1], &err, sizeof err);
    ::_exit(127);
  }
  ::close(errpipe[1]);
  int exec_errno = 0;
  ssize_t got;
  do got = ::read(errpipe[0], &exec_errno, sizeof exec_errno); while (got < 0 && errno == EINTR);
  ::close(errpipe[0]);
  int ws = 0;
  pid_t r;
  do r = ::waitpid(pid, &ws, 0); while (r < 0 && errno == EINTR);
  if (got == static_cast<ssize_t>(sizeof exec_errno)) {
    std::fprintf(stderr, "memento-bench erasure: cannot run mpirun: %s (run the benchmark under mpirun yourself)\n",
                 std::strerror(exec_errno));
    return kExitSkipped;
  }
  if (r < 0) return kExitFailed;
  if (WIFEXITED(ws)) return WEXITSTATUS(ws);
  std::fprintf(stderr, "memento-bench erasure: mpirun was killed by signal %s\n", strsignal(WTERMSIG(ws)));
  return kExitFailed;
}

// ---- the worker: one rank = one node ------------------------------------------------------------

// Ends the whole MPI job from any rank: a collective would otherwise wait for this one forever.
// `remove` (a file or directory) goes first.
[[noreturn]] void Fatal(int rank, const Status& st, const std::string& remove = "") {
  std::fprintf(stderr, "memento-bench erasure: rank %d: %s\n", rank, st.ToString().c_str());
  std::fflush(stderr);
  if (!remove.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(remove, ec);
  }
  MPI_Abort(MPI_COMM_WORLD, kExitFailed);
  std::_Exit(kExitFailed);
}

void FillRandom(uint8_t* p, size_t n, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, 8);
  }
  for (; i < n; ++i) p[i] = static_cast<uint8_t>(x >> (8 * (i % 8)));
}

// Everything every rank prints or reports, medians in seconds.
struct Figures {
  Samples isal, isal_solo, p2p, partial, holders, rebuild, rebuild_gather, rebuild_chain, storage;
  Samples partial_faults, holders_faults, rebuild_faults;  // minor page faults per node and run
  uint64_t p2p_bytes = 0;        // bytes each node sends in one p2p run
  uint64_t holders_bytes = 0;    // bytes each node sends in one send-to-holders encode
  uint64_t partial_bytes = 0;    // bytes of partial parities each node hands to the reduce-scatter
  uint64_t rebuild_received_bytes = 0;        // bytes the lost node receives in one rebuild (gather)
  uint64_t rebuild_chain_received_bytes = 0;  // the same with the chain: the bytes it rebuilds
  bool storage_direct = true;
  std::string storage_fs;
  std::string storage_dir;
};

class Worker {
 public:
  Worker(const ErasureFlags& flags, Communicator* world) : flags_(flags), world_(world), rank_(world->rank()) {}

  int Run() {
    if (Status st = Setup(); !st.ok()) Fatal(rank_, st);
    Banner();
    for (int i = -kWarmupIterations; i < flags_.iters; ++i) EncodeRound(i);
    CheckEncodings();
    const bool rebuilt = RebuildRounds();
    StorageRounds();
    if (rank_ == 0) Report(rebuilt);
    return rebuilt ? kExitOk : kExitFailed;
  }

 private:
  Status Setup() {
    MEMENTO_ASSIGN_OR_RETURN(Scheme scheme, Scheme::Parse(flags_.scheme));
    MEMENTO_ASSIGN_OR_RETURN(group_, ParityGroup::Create(scheme, world_->size(), world_, {}));
    MEMENTO_ASSIGN_OR_RETURN(codec_, Codec::Create(scheme, group_->layout().k()));
    lost_ = group_->index() == kLostIndex;
    // Two slots of slightly different sizes per node, bytes in all.
    const uint64_t b = flags_.bytes;
    uint64_t first = b / 2 + 4096 * static_cast<uint64_t>(group_->index()) + 1000;
    if (first >= b) first = b > 1 ? b - 1 : b;
    MEMENTO_ASSIGN_OR_RETURN(slot0_, HostBuffer::Create(first, 1));
    MEMENTO_ASSIGN_OR_RETURN(slot1_, HostBuffer::Create(b - first, 2));
    FillRandom(slot0_->data(), slot0_->size(), 2 * static_cast<uint64_t>(rank_) + 1);
    FillRandom(slot1_->data(), slot1_->size(), 2 * static_cast<uint64_t>(rank_) + 2);
    data_.Add(slot0_->data(), slot0_->size());
    data_.Add(slot1_->data(), slot1_->size());
    // The group agrees on the padded length.
    uint64_t mine = data_.size();
    std::vector<uint64_t> all(world_->size());
    MEMENTO_RETURN_IF_ERROR(world_->Allgather(&mine, sizeof mine, all.data()));
    padded_ = group_->PaddedLength(*std::max_element(all.begin(), all.end()));
    seg_ = group_->layout().SegmentLength(padded_);
    const size_t parity_bytes = group_->ParityLength(padded_);
    // The node's bytes, padded, in one piece: ISA-L's input, the p2p source, the rebuild reference.
    MEMENTO_ASSIGN_OR_RETURN(contiguous_, HostBuffer::Create(padded_, 0));
    data_.Read(0, padded_, contiguous_->data());
    MEMENTO_ASSIGN_OR_RETURN(parity_partial_, HostBuffer::Create(parity_bytes, 3));
    MEMENTO_ASSIGN_OR_RETURN(parity_holders_, HostBuffer::Create(parity_bytes, 4));
    const size_t aligned_bytes = (flags_.bytes + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    MEMENTO_ASSIGN_OR_RETURN(scratch_, HostBuffer::Create(std::max<size_t>(padded_, aligned_bytes), 5));
    // What the encodings move per node.
    const StripeLayout& layout = group_->layout();
    const int n = layout.group_size(), m = layout.m();
    for (int s = 0; s < n; ++s) {
      if (layout.SegmentOf(group_->index(), s) < 0) continue;
      for (int j = 0; j < m; ++j) {
        if (layout.HolderIndex(s, j) != group_->index()) fig_.holders_bytes += seg_;
      }
    }
    fig_.partial_bytes = static_cast<uint64_t>(n) * m * seg_;
    // What the lost member receives in a rebuild: each source of each stripe it is part of.
    const int k = layout.k();
    for (int s = 0; s < n; ++s) {
      auto member_of = [&](int c) { return c < k ? layout.ContributorsOf(s)[c] : layout.HolderIndex(s, c - k); };
      std::vector<int> erased;
      for (int c = 0; c < k + m; ++c) {
        if (member_of(c) == kLostIndex) erased.push_back(c);
      }
      if (erased.empty()) continue;
      MEMENTO_ASSIGN_OR_RETURN(DecodePlan plan, codec_->PlanDecode(erased));
      for (int c : plan.sources()) {
        if (member_of(c) != kLostIndex) fig_.rebuild_received_bytes += seg_;
      }
      fig_.rebuild_chain_received_bytes += erased.size() * seg_;
    }
    fig_.p2p_bytes = fig_.holders_bytes > 0 ? fig_.holders_bytes : padded_;
    return Status::Ok();
  }

  void Banner() {
    if (rank_ != 0) return;
    const StripeLayout& layout = group_->layout();
    std::printf("erasure: %s over %d nodes (k=%d, m=%d), %s per node (padded %s, segment %s, parity %s per node), "
                "%d iterations; %d ranks on %u CPUs%s\n",
                flags_.scheme.c_str(), layout.group_size(), layout.k(), layout.m(), FormatBytes(flags_.bytes).c_str(),
                FormatBytes(padded_).c_str(), FormatBytes(seg_).c_str(),
                FormatBytes(group_->ParityLength(padded_)).c_str(), flags_.iters, world_->size(),
                std::thread::hardware_concurrency(),
                static_cast<unsigned>(world_->size()) > std::thread::hardware_concurrency() ? " (oversubscribed)" : "");
    std::fflush(stdout);
  }

  void Barrier() {
    uint8_t in = 0;
    std::vector<uint8_t> out(world_->size());
    if (Status st = world_->Allgather(&in, 1, out.data()); !st.ok()) Fatal(rank_, st);
  }

  // The slowest rank's time of `op`, run by every rank between barriers; `faults` (when given)
  // receives the mean over ranks of the minor page faults `op` took.
  double TimeCollective(const std::function<Status()>& op, double* faults = nullptr) {
    Barrier();
    struct rusage r0 {}, r1 {};
    ::getrusage(RUSAGE_SELF, &r0);
    const auto t0 = Clock::now();
    Status st = op();
    const double s = Seconds(t0, Clock::now());
    ::getrusage(RUSAGE_SELF, &r1);
    if (!st.ok()) Fatal(rank_, st);
    const double mine[2] = {s, static_cast<double>(r1.ru_minflt - r0.ru_minflt)};
    std::vector<double> all(2 * static_cast<size_t>(world_->size()));
    if (Status g = world_->Allgather(mine, sizeof mine, all.data()); !g.ok()) Fatal(rank_, g);
    double slowest = 0, fault_sum = 0;
    for (int r = 0; r < world_->size(); ++r) {
      slowest = std::max(slowest, all[2 * r]);
      fault_sum += all[2 * r + 1];
    }
    if (faults != nullptr) *faults = fault_sum / world_->size();
    return slowest;
  }

  Status IsalEncode() {
    const int k = codec_->k(), m = codec_->m();
    std::vector<const uint8_t*> in(k);
    std::vector<uint8_t*> out(m);
    for (int t = 0; t < k; ++t) in[t] = contiguous_->data() + static_cast<size_t>(t) * seg_;
    for (int j = 0; j < m; ++j) out[j] = parity_holders_->data() + static_cast<size_t>(j) * seg_;
    codec_->Encode(in.data(), out.data(), seg_);
    return Status::Ok();
  }

  // Ring: send p2p_bytes to the next rank, receive as many from the previous, k * m messages of
  // 8 MiB per Exchange, from the node's padded bytes into the scratch buffer (both cyclically).
  Status RingExchange() {
    const int n = world_->size();
    const int next = (rank_ + 1) % n, prev = (rank_ + n - 1) % n;
    const int per_round = std::max(1, codec_->k() * codec_->m());
    uint64_t done = 0;
    size_t src_off = 0, dst_off = 0;
    int tag = 0;
    while (done < fig_.p2p_bytes) {
      std::vector<Communicator::Message> sends, recvs;
      for (int i = 0; i < per_round && done < fig_.p2p_bytes; ++i) {
        size_t len = std::min<uint64_t>(kMessageBytes, fig_.p2p_bytes - done);
        len = std::min(len, padded_ - src_off);
        len = std::min(len, padded_ - dst_off);
        sends.push_back({next, tag, contiguous_->data() + src_off, len});
        recvs.push_back({prev, tag, scratch_->data() + dst_off, len});
        ++tag;
        done += len;
        src_off = (src_off + len) % padded_;
        dst_off = (dst_off + len) % padded_;
      }
      MEMENTO_RETURN_IF_ERROR(world_->Exchange(sends, recvs));
    }
    return Status::Ok();
  }

  void EncodeRound(int i) {
    const bool timed = i >= 0;
    const double isal = TimeCollective([&] { return IsalEncode(); });
    // Rank 0 alone: the one-core figure.
    Barrier();
    double solo = 0;
    if (rank_ == 0) {
      const auto t0 = Clock::now();
      (void)IsalEncode();
      solo = Seconds(t0, Clock::now());
    }
    Barrier();
    const double p2p = TimeCollective([&] { return RingExchange(); });
    double partial_faults = 0, holders_faults = 0;
    const double partial =
        TimeCollective([&] { return group_->Encode(data_, padded_, parity_partial_->data()); }, &partial_faults);
    const double holders = TimeCollective(
        [&] { return group_->EncodeToHolders(data_, padded_, parity_holders_->data()); }, &holders_faults);
    if (timed) {
      fig_.isal.Add(isal);
      fig_.isal_solo.Add(solo);
      fig_.p2p.Add(p2p);
      fig_.partial.Add(partial);
      fig_.holders.Add(holders);
      fig_.partial_faults.Add(partial_faults);
      fig_.holders_faults.Add(holders_faults);
    }
    if (flags_.verbose && rank_ == 0) {
      std::printf("  %s %d: isal %.1f ms (rank 0 alone %.1f ms), p2p %.1f ms, encode partial %.1f ms (%.0f minor "
                  "faults per node), holders %.1f ms (%.0f)\n",
                  timed ? "iteration" : "warm-up", timed ? i : -i - 1, isal * 1e3, solo * 1e3, p2p * 1e3,
                  partial * 1e3, partial_faults, holders * 1e3, holders_faults);
      std::fflush(stdout);
    }
  }

  // Both encodings must give the same parity on every node.
  void CheckEncodings() {
    const size_t n = group_->ParityLength(padded_);
    const uint8_t* a = parity_partial_->data();
    const uint8_t* b = parity_holders_->data();
    int64_t bad = -1;
    if (std::memcmp(a, b, n) != 0) {
      for (size_t i = 0; i < n; ++i) {
        if (a[i] != b[i]) {
          bad = static_cast<int64_t>(i);
          break;
        }
      }
    }
    std::vector<int64_t> all(world_->size());
    if (Status st = world_->Allgather(&bad, sizeof bad, all.data()); !st.ok()) Fatal(rank_, st);
    for (int r = 0; r < world_->size(); ++r) {
      if (all[r] >= 0) {
        if (rank_ == 0) {
          std::fprintf(stderr, "memento-bench erasure: MISMATCH: rank %d's parity from partial parities and from "
                               "sending to holders differ first at byte %lld\n", r, static_cast<long long>(all[r]));
        }
        Fatal(rank_, Internal("the two encodings disagree"));
      }
    }
  }

  // -1 when node 1's data and parity equal what they were before the loss; else the first bad
  // offset (data offsets as they are, parity offsets after the data's padded length).
  int64_t CheckRebuilt() const {
    auto first_diff = [](const uint8_t* a, const uint8_t* b, size_t n) -> int64_t {
      if (std::memcmp(a, b, n) == 0) return -1;
      for (size_t i = 0; i < n; ++i) {
        if (a[i] != b[i]) return static_cast<int64_t>(i);
      }
      return -1;
    };
    if (int64_t d = first_diff(slot0_->data(), contiguous_->data(), slot0_->size()); d >= 0) return d;
    if (int64_t d = first_diff(slot1_->data(), contiguous_->data() + slot0_->size(), slot1_->size()); d >= 0) {
      return static_cast<int64_t>(slot0_->size()) + d;
    }
    // The parity was checked equal between the encodings: the holders' copy is the reference.
    if (int64_t d = first_diff(parity_partial_->data(), parity_holders_->data(), group_->ParityLength(padded_));
        d >= 0) {
      return static_cast<int64_t>(padded_) + d;
    }
    return -1;
  }

  // Both rebuild methods, alternating in every iteration; the agent's (kAuto) is the "rebuild".
  bool RebuildRounds() {
    using Method = ParityGroup::RebuildMethod;
    const bool chain_is_auto = group_->layout().k() > 1;
    bool ok = true;
    for (int i = -kWarmupIterations; i < flags_.iters && ok; ++i) {
      for (Method method : {Method::kGather, Method::kChain}) {
        if (lost_) {  // the node's memory is gone
          std::memset(slot0_->data(), 0, slot0_->size());
          std::memset(slot1_->data(), 0, slot1_->size());
          std::memset(parity_partial_->data(), 0, group_->ParityLength(padded_));
        }
        double faults = 0;
        const double s = TimeCollective(
            [&] { return group_->Rebuild({kLostIndex}, &data_, parity_partial_->data(), padded_, method); }, &faults);
        const int64_t bad = lost_ ? CheckRebuilt() : -1;
        std::vector<int64_t> all(world_->size());
        if (Status st = world_->Allgather(&bad, sizeof bad, all.data()); !st.ok()) Fatal(rank_, st);
        for (int r = 0; r < world_->size(); ++r) {
          if (all[r] < 0) continue;
          ok = false;
          if (rank_ == 0) {
            const bool parity = all[r] >= static_cast<int64_t>(padded_);
            std::fprintf(stderr, "memento-bench erasure: REBUILD FAILED (%s): node %d's rebuilt %s differs from the "
                                 "original at byte %lld\n", method == Method::kChain ? "chain" : "gather", r,
                         parity ? "parity" : "data",
                         static_cast<long long>(parity ? all[r] - static_cast<int64_t>(padded_) : all[r]));
          }
        }
        if (i >= 0) {
          (method == Method::kChain ? fig_.rebuild_chain : fig_.rebuild_gather).Add(s);
          if ((method == Method::kChain) == chain_is_auto) {
            fig_.rebuild.Add(s);
            fig_.rebuild_faults.Add(faults);
          }
        }
        if (flags_.verbose && rank_ == 0) {
          std::printf("  rebuild (%s) %s %d: %.1f ms (%.0f minor faults per node)\n",
                      method == Method::kChain ? "chain" : "gather", i >= 0 ? "iteration" : "warm-up",
                      i >= 0 ? i : -i - 1, s * 1e3, faults);
          std::fflush(stdout);
        }
        if (!ok) break;
      }
    }
    return ok;
  }

  // ---- storage: the lost node reads its bytes back; the others wait ----

  Status WriteStorageFile(const std::string& path) {
    MEMENTO_ASSIGN_OR_RETURN(auto file, PosixFileSystem()->NewWritableFile(path));
    MEMENTO_RETURN_IF_ERROR(file->Append(contiguous_->data(), flags_.bytes));
    MEMENTO_RETURN_IF_ERROR(file->Sync());
    return file->Close();
  }

  // Opens `path` with O_DIRECT and reads it whole in 16 MiB preads; where O_DIRECT is refused,
  // buffered after dropping the file's pages. Returns the seconds from open to close.
  Result<double> ReadStorageFile(const std::string& path) {
    uint8_t* dst = scratch_->data();
    const uint64_t total = flags_.bytes;
    for (int attempt = 0; attempt < 2; ++attempt) {
      const bool direct = fig_.storage_direct;
      if (!direct) {
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) return PosixError("open(" + path + ")");
        ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        ::close(fd);
      }
      const auto t0 = Clock::now();
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
      if (fd < 0) {
        if (direct && errno == EINVAL) {
          fig_.storage_direct = false;
          continue;
        }
        return PosixError("open(" + path + ")");
      }
      uint64_t off = 0;
      bool refused = false;
      while (off < total) {
        size_t want = static_cast<size_t>(std::min<uint64_t>(kReadChunk, total - off));
        if (direct) want = (want + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
        const ssize_t n = ::pread(fd, dst + off, want, static_cast<off_t>(off));
        if (n < 0) {
          if (errno == EINTR) continue;
          const int err = errno;
          ::close(fd);
          if (direct && err == EINVAL && off == 0) {
            refused = true;
            break;
          }
          return PosixError("pread(" + path + ")", err);
        }
        if (n == 0) {
          ::close(fd);
          return DataLoss(path + " is shorter than the " + std::to_string(total) + " bytes written");
        }
        off += static_cast<uint64_t>(n);
      }
      if (refused) {
        fig_.storage_direct = false;
        continue;
      }
      ::close(fd);
      const double s = Seconds(t0, Clock::now());
      if (std::memcmp(dst, contiguous_->data(), total) != 0) {
        return DataLoss("the bytes read back from " + path + " differ from those written");
      }
      return s;
    }
    return Internal("unreachable");
  }

  void StorageRounds() {
    std::unique_ptr<StorageSpot> own;  // when run under mpirun directly, without the launcher
    std::string path = flags_.storage_file;
    std::string cleanup;  // removed before an abort
    if (lost_) {
      if (path.empty()) {
        auto spot = StorageSpot::Open(flags_.dir, "memento-bench-erasure-" + std::to_string(::getpid()) + ".data");
        if (!spot.ok()) Fatal(rank_, spot.status());
        own = std::move(spot).value();
        path = own->file();
      } else {
        RemoveOnFatalSignal(path);
      }
      cleanup = own != nullptr ? own->removal() : path;
      fig_.storage_dir = std::filesystem::path(path).parent_path().string();
      fig_.storage_fs = FileSystemName(fig_.storage_dir);
      if (Status st = WriteStorageFile(path); !st.ok()) Fatal(rank_, st.WithContext("writing " + path), cleanup);
    }
    for (int i = -kWarmupIterations; i < flags_.iters; ++i) {
      Barrier();
      double s = 0;
      if (lost_) {
        auto r = ReadStorageFile(path);
        if (!r.ok()) Fatal(rank_, r.status(), cleanup);
        s = *r;
      }
      std::vector<double> all(world_->size());
      if (Status g = world_->Allgather(&s, sizeof s, all.data()); !g.ok()) Fatal(rank_, g, cleanup);
      const double storage_s = *std::max_element(all.begin(), all.end());
      if (i >= 0) fig_.storage.Add(storage_s);
      if (flags_.verbose && rank_ == 0) {
        std::printf("  storage %s %d: %.1f ms\n", i >= 0 ? "iteration" : "warm-up", i >= 0 ? i : -i - 1,
                    storage_s * 1e3);
        std::fflush(stdout);
      }
    }
    if (lost_ && own == nullptr) {
      std::error_code ec;
      std::filesystem::remove(path, ec);
      ForgetOnFatalSignal(path);
    }
    own.reset();
    // Rank 0 reports where the lost node's file was.
    struct Desc {
      char fs[32];
      char dir[480];
      int direct;
    } mine{};
    std::snprintf(mine.fs, sizeof mine.fs, "%s", fig_.storage_fs.c_str());
    std::snprintf(mine.dir, sizeof mine.dir, "%s", fig_.storage_dir.c_str());
    mine.direct = fig_.storage_direct ? 1 : 0;
    std::vector<Desc> all(world_->size());
    if (Status g = world_->Allgather(&mine, sizeof mine, all.data()); !g.ok()) Fatal(rank_, g);
    for (const Desc& d : all) {
      if (d.dir[0] != '\0') {
        fig_.storage_fs = d.fs;
        fig_.storage_dir = d.dir;
        fig_.storage_direct = d.direct != 0;
      }
    }
  }

  void Report(bool rebuilt) {
    const double isal_gbps = GBps(padded_, fig_.isal.Median());
    const double isal_solo_gbps = GBps(padded_, fig_.isal_solo.Median());
    const double p2p_gbps = GBps(fig_.p2p_bytes, fig_.p2p.Median());
    const double partial_gbps = GBps(padded_, fig_.partial.Median());
    const double holders_gbps = GBps(padded_, fig_.holders.Median());
    const double limit_gbps = std::min(isal_gbps, p2p_gbps);
    const bool holders_faster = holders_gbps > partial_gbps;
    const double best_gbps = std::max(partial_gbps, holders_gbps);
    const double ratio = limit_gbps > 0 ? best_gbps / limit_gbps : 0;
    const double ratio_partial = limit_gbps > 0 ? partial_gbps / limit_gbps : 0;
    const double ratio_holders = limit_gbps > 0 ? holders_gbps / limit_gbps : 0;
    const double rebuild_s = fig_.rebuild.Median();
    const double storage_s = fig_.storage.Median();
    const double speedup = rebuild_s > 0 ? storage_s / rebuild_s : 0;
    const int n = world_->size();
    const char* limit_name = "min(ISA-L ec_encode_data 1 thread, MPI p2p)";
    const bool isal_limits = isal_gbps <= p2p_gbps;
    // Sending to holders moves holders_bytes per padded_ bytes of data (m copies of each segment):
    // the data rate it could reach if it sent at the measured p2p rate.
    const double holders_net_bound_gbps =
        fig_.holders_bytes > 0 ? p2p_gbps * static_cast<double>(padded_) / static_cast<double>(fig_.holders_bytes) : 0;

    std::printf("%-34s%7.2f GB/s per node (all nodes at once; rank 0 alone %.2f GB/s)\n",
                "ISA-L ec_encode_data, 1 thread:", isal_gbps, isal_solo_gbps);
    std::printf("%-34s%7.2f GB/s per node sent (ring Exchange of %s per node, 8 MiB messages, all at once)\n",
                "MPI p2p:", p2p_gbps, FormatBytes(fig_.p2p_bytes).c_str());
    std::printf("%-34s%7.2f GB/s per node (%s)\n", "limit:", limit_gbps,
                isal_limits ? "ISA-L is the smaller" : "MPI p2p is the smaller");
    std::printf("%-34s%7.2f GB/s per node, %.2f aggregate; ratio %.2f (goal >= %.1f)%s; reduce-scatter input %s "
                "per node\n",
                "encode, partial + reduce-scatter:", partial_gbps, partial_gbps * n, ratio_partial, kGoalRatio,
                ratio_partial >= kGoalRatio ? "" : "   BELOW GOAL", FormatBytes(fig_.partial_bytes).c_str());
    std::printf("%-34s%7.2f GB/s per node, %.2f aggregate; ratio %.2f (goal >= %.1f)%s; sends %s per node (at the "
                "p2p rate: %.2f GB/s of data)\n",
                "encode, send to holders:", holders_gbps, holders_gbps * n, ratio_holders, kGoalRatio,
                ratio_holders >= kGoalRatio ? "" : "   BELOW GOAL", FormatBytes(fig_.holders_bytes).c_str(),
                holders_net_bound_gbps);
    std::printf("%-34s%s (%.2fx the other)%s\n", "faster:", holders_faster ? "holders" : "partial",
                holders_faster ? holders_gbps / partial_gbps : partial_gbps / holders_gbps,
                holders_faster ? ", the agent's default (--ec-encode holders)"
                               : "   the agent's default is holders (--ec-encode): partial won here");
    const bool chain_is_auto = group_->layout().k() > 1;
    std::printf("%-34s%7.1f ms   node %d's %s of data and %s of parity, %s (median of %zu), the agent's way (%s)\n",
                "rebuild of a lost node:", rebuild_s * 1e3, kLostIndex, FormatBytes(flags_.bytes).c_str(),
                FormatBytes(group_->ParityLength(padded_)).c_str(), rebuilt ? "bit-exact" : "WRONG", fig_.rebuild.size(),
                chain_is_auto ? "chain" : "gather");
    std::printf("%-34s%7.1f ms   gather: it received %s (%.2f GB/s)%s\n", "  by gathering the sources:",
                fig_.rebuild_gather.Median() * 1e3, FormatBytes(fig_.rebuild_received_bytes).c_str(),
                GBps(fig_.rebuild_received_bytes, fig_.rebuild_gather.Median()), chain_is_auto ? "" : "  (the agent's)");
    std::printf("%-34s%7.1f ms   chained partial decodes: it received %s (%.2f GB/s)%s\n", "  by a chain of partial decodes:",
                fig_.rebuild_chain.Median() * 1e3, FormatBytes(fig_.rebuild_chain_received_bytes).c_str(),
                GBps(fig_.rebuild_chain_received_bytes, fig_.rebuild_chain.Median()),
                chain_is_auto ? "  (the agent's)" : "  (k = 1: the same as gathering)");
    std::printf("%-34s%7.1f ms   %s from %s (%s), %s, %.2f GB/s\n", "restore from storage:", storage_s * 1e3,
                FormatBytes(flags_.bytes).c_str(), fig_.storage_dir.c_str(), fig_.storage_fs.c_str(),
                fig_.storage_direct ? "O_DIRECT preads of 16 MiB"
                                    : "buffered reads after POSIX_FADV_DONTNEED (O_DIRECT refused here)",
                GBps(flags_.bytes, storage_s));
    std::printf("%-34s%7.2fx  (goal >= %.0fx)%s\n", "rebuild speedup over storage:", speedup, kGoalRebuildSpeedup,
                speedup >= kGoalRebuildSpeedup ? "" : "   BELOW GOAL");
    if (flags_.json) {
      JsonLine j;
      j.Add("bench", "erasure")
          .Add("scheme", flags_.scheme)
          .Add("nodes", n)
          .Add("bytes", flags_.bytes)
          .Add("padded_bytes", static_cast<uint64_t>(padded_))
          .Add("ratio", ratio)
          .Add("limit", limit_name)
          .Add("limit_gbps", limit_gbps)
          .Add("isal_gbps", isal_gbps)
          .Add("isal_solo_gbps", isal_solo_gbps)
          .Add("mpi_p2p_gbps", p2p_gbps)
          .Add("encode_partial_gbps", partial_gbps)
          .Add("encode_holders_gbps", holders_gbps)
          .Add("ratio_partial", ratio_partial)
          .Add("ratio_holders", ratio_holders)
          .Add("faster", holders_faster ? "holders" : "partial")
          .Add("isal_ms", fig_.isal.Median() * 1e3)
          .Add("mpi_p2p_ms", fig_.p2p.Median() * 1e3)
          .Add("encode_partial_ms", fig_.partial.Median() * 1e3)
          .Add("encode_holders_ms", fig_.holders.Median() * 1e3)
          .Add("mpi_p2p_bytes", fig_.p2p_bytes)
          .Add("holders_sent_bytes", fig_.holders_bytes)
          .Add("holders_net_bound_gbps", holders_net_bound_gbps)
          .Add("partial_reduce_bytes", fig_.partial_bytes)
          .Add("encode_partial_minor_faults", fig_.partial_faults.Median())
          .Add("encode_holders_minor_faults", fig_.holders_faults.Median())
          .Add("rebuild_s", rebuild_s)
          .Add("rebuild_received_bytes", chain_is_auto ? fig_.rebuild_chain_received_bytes : fig_.rebuild_received_bytes)
          .Add("rebuild_method", chain_is_auto ? "chain" : "gather")
          .Add("rebuild_gather_s", fig_.rebuild_gather.Median())
          .Add("rebuild_chain_s", fig_.rebuild_chain.Median())
          .Add("rebuild_gather_received_bytes", fig_.rebuild_received_bytes)
          .Add("rebuild_chain_received_bytes", fig_.rebuild_chain_received_bytes)
          .Add("rebuild_ok", rebuilt)
          .Add("storage_restore_s", storage_s)
          .Add("storage_direct", fig_.storage_direct)
          .Add("storage_fs", fig_.storage_fs)
          .Add("dir", fig_.storage_dir)
          .Add("rebuild_speedup", speedup)
          .Add("iters", flags_.iters)
          .Add("cpus", static_cast<int>(std::thread::hardware_concurrency()))
          .Add("goal_ratio", kGoalRatio)
          .Add("goal_rebuild_speedup", kGoalRebuildSpeedup);
      std::printf("%s\n", j.str().c_str());
    }
    std::fflush(stdout);
  }

  const ErasureFlags& flags_;
  Communicator* world_;
  int rank_;
  std::unique_ptr<ParityGroup> group_;
  std::unique_ptr<Codec> codec_;
  bool lost_ = false;
  std::unique_ptr<HostBuffer> slot0_, slot1_, contiguous_, parity_partial_, parity_holders_, scratch_;
  NodeData data_;
  size_t padded_ = 0;
  size_t seg_ = 0;
  Figures fig_;
};

int WorkerMain(const ErasureFlags& flags, int argc, char** argv) {
  if (Status st = InitMpi(&argc, &argv); !st.ok()) {
    std::fprintf(stderr, "memento-bench erasure: %s\n", st.ToString().c_str());
    return kExitFailed;
  }
  int rc;
  {
    std::unique_ptr<Communicator> world = MakeMpiCommunicator();
    if (flags.nodes_given && flags.nodes != world->size() && world->rank() == 0) {
      std::fprintf(stderr, "memento-bench erasure: --nodes %d ignored: the group is the MPI world of %d ranks\n",
                   flags.nodes, world->size());
    }
    Worker worker(flags, world.get());
    rc = worker.Run();
  }  // communicators are freed before MPI is finalized
  FinalizeMpi();
  return rc;
}

}  // namespace

int ErasureMain(int argc, char** argv) {
  ErasureFlags flags;
  bool help = false;
  if (Status st = ParseFlags(argc, argv, &flags, &help); !st.ok()) {
    std::fprintf(stderr, "memento-bench erasure: %s\n\n%s", st.message().c_str(), kUsage);
    return kExitUsage;
  }
  if (help) {
    std::printf("%s", kUsage);
    return kExitOk;
  }
  if (UnderMpi()) return WorkerMain(flags, argc, argv);
  if (flags.worker) {
    std::fprintf(stderr, "memento-bench erasure: --worker outside mpirun\n");
    return kExitUsage;
  }
  // The group is --nodes ranks: the scheme must fit it before anything starts.
  if (auto layout = StripeLayout::Create(*Scheme::Parse(flags.scheme), flags.nodes); !layout.ok()) {
    std::fprintf(stderr, "memento-bench erasure: --nodes %d: %s\n\n%s", flags.nodes, layout.status().message().c_str(),
                 kUsage);
    return kExitUsage;
  }
  return Launch(flags, argc, argv);
}

}  // namespace memento::bench
