// memento-bench convert: how fast `memento convert <native> --to ucp <out>` consolidates a native
// checkpoint, as a fraction of what `cp -r` of the same checkpoint (then `sync` of the copies, as
// the conversion syncs what it writes) reaches on the same directory in the same run, and the
// conversion's peak RSS against 2 x the largest tensor + 256 MiB.
//
// The source: --params parameters of equal size, each with its value (split along dim 1 over --tp,
// replicated over DP) and two Adam moments (ZeRO-1-like flat partitions over all ranks), written
// by WriteRankFiles for every rank of tp x dp. Then, per iteration, in alternation: cp -r + sync,
// and the `memento` binary next to this one (a child process: its wall time and, from wait4, its
// peak RSS). Medians of --iters.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "bench/harness.h"
#include "bench/subcommands.h"
#include "core/dtype.h"
#include "core/file_system.h"
#include "core/shard.h"
#include "proto/memento.pb.h"
#include "proto/shard_convert.h"
#include "ucp_format/native_checkpoint.h"

namespace memento::bench {
namespace {

constexpr const char* kUsage =
    "usage: memento-bench convert [flags]\n"
    "  --dir DIR        working directory (default: a fresh directory under /tmp, removed at the end)\n"
    "  --bytes B        state of the whole model (values + 2 moments, fp32), K/M/G suffixes (default 1G)\n"
    "  --params N       parameters of equal size (default 16)\n"
    "  --tp T           tensor-parallel degree of the source (default 2)\n"
    "  --dp D           data-parallel degree of the source (default 2)\n"
    "  --threads N      conversion threads (memento convert --threads; default 4)\n"
    "  --iters N        timed iterations of cp and convert (default 3)\n"
    "  --json           end with one line of JSON holding every figure\n";

constexpr double kGoalRatio = 0.7;
constexpr uint64_t kRssSlack = uint64_t{256} << 20;

struct ConvertFlags {
  std::string dir;
  uint64_t bytes = uint64_t{1} << 30;
  int params = 16;
  int tp = 2;
  int dp = 2;
  int threads = 4;
  int iters = 3;
  bool json = false;
};

Status ParseFlags(int argc, char** argv, ConvertFlags* f, bool* help) {
  FlagReader r(argc, argv);
  while (r.Next()) {
    const std::string& n = r.name();
    if (n == "--dir") MEMENTO_RETURN_IF_ERROR(r.String(&f->dir));
    else if (n == "--bytes") MEMENTO_RETURN_IF_ERROR(r.Bytes(&f->bytes));
    else if (n == "--params") MEMENTO_RETURN_IF_ERROR(r.Int(&f->params, 1));
    else if (n == "--tp") MEMENTO_RETURN_IF_ERROR(r.Int(&f->tp, 1));
    else if (n == "--dp") MEMENTO_RETURN_IF_ERROR(r.Int(&f->dp, 1));
    else if (n == "--threads") MEMENTO_RETURN_IF_ERROR(r.Int(&f->threads, 1));
    else if (n == "--iters") MEMENTO_RETURN_IF_ERROR(r.Int(&f->iters, 1));
    else if (n == "--json") MEMENTO_RETURN_IF_ERROR(r.Switch(&f->json));
    else if (n == "-h" || n == "--help") *help = true;
    else return r.Unknown();
  }
  return Status::Ok();
}

uint64_t Align(uint64_t n) { return (n + 4095) / 4096 * 4096; }

// Writes the source checkpoint; returns the shape of each parameter.
Status WriteSource(const ConvertFlags& f, const std::string& dir, std::vector<int64_t>* shape) {
  const int world = f.tp * f.dp;
  // Square-ish [rows, cols] with cols a multiple of tp, 3 states of 4 bytes per element.
  const uint64_t per_param = std::max<uint64_t>(f.bytes / static_cast<uint64_t>(f.params) / 12, 1);
  int64_t cols = 1024 * f.tp;
  int64_t rows = std::max<int64_t>(1, static_cast<int64_t>(per_param) / cols);
  *shape = {rows, cols};
  std::vector<proto::ManifestRank> entries;
  PersistOptions options;
  for (int r = 0; r < world; ++r) {
    const int t = r % f.tp, d = r / f.tp;
    proto::RankRecord rec;
    rec.set_rank(r);
    rec.set_world_size(world);
    uint64_t offset = 0;
    for (int p = 0; p < f.params; ++p) {
      const std::string name = "layers." + std::to_string(p) + ".w";
      for (const char* suffix : {"", ".exp_avg", ".exp_avg_sq"}) {
        ShardSpec spec;
        if (suffix[0] == '\0') {
          Result<ShardSpec> s = SplitEvenly(*shape, 1, f.tp, t, d);
          if (!s.ok()) return s.status();
          spec = *s;
        } else {
          Result<std::vector<FlatPartitionEntry>> z = ZeroFlatPartition({*shape}, world, r);
          if (!z.ok()) return z.status();
          spec = (*z)[0].spec;
          spec.local_numel = ZeroPartitionSize({*shape}, world);
        }
        proto::TensorRecord* tr = rec.add_tensors();
        tr->set_name(name + suffix);
        tr->set_dtype(static_cast<int32_t>(DType::kF32));
        ToProto(spec, tr->mutable_spec());
        tr->set_slot_offset(offset);
        tr->set_bytes(static_cast<uint64_t>(spec.local_numel) * 4);
        offset += Align(std::max<uint64_t>(tr->bytes(), 1));
      }
    }
    rec.set_slot_bytes(offset);
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<HostBuffer> slot, HostBuffer::Create(offset, static_cast<uint8_t>(r)));
    RankImage image{r, world, &rec, slot->data()};
    MEMENTO_ASSIGN_OR_RETURN(proto::ManifestRank e, WriteRankFiles(PosixFileSystem(), dir, "bench", 1, image, options));
    entries.push_back(e);
  }
  return CommitManifest(PosixFileSystem(), dir, BuildManifest("bench", 1, world, entries));
}

struct ChildRun {
  int exit_code = -1;
  double seconds = 0;
  uint64_t max_rss_bytes = 0;
  std::string output;
};

// Runs argv (stdout and stderr to `log`), timed from fork to wait4; its peak RSS from wait4.
ChildRun RunChild(const std::vector<std::string>& argv, const std::string& log) {
  ChildRun out;
  const auto start = Clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
    FILE* f = std::freopen(log.c_str(), "w", stdout);
    if (f == nullptr) ::_exit(126);
    ::dup2(STDOUT_FILENO, STDERR_FILENO);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  int status = 0;
  struct rusage usage {};
  if (pid > 0 && ::wait4(pid, &status, 0, &usage) == pid) {
    out.seconds = Seconds(start, Clock::now());
    out.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    out.max_rss_bytes = static_cast<uint64_t>(usage.ru_maxrss) * 1024;
  }
  Result<std::string> text = ReadFileToString(PosixFileSystem(), log);
  if (text.ok()) out.output = *text;
  return out;
}

// The value of "key": <number> in a one-line JSON object; 0 when absent.
uint64_t JsonNumber(const std::string& json, const std::string& key) {
  const size_t at = json.find("\"" + key + "\":");
  return at == std::string::npos ? 0 : std::strtoull(json.c_str() + at + key.size() + 3, nullptr, 10);
}

std::vector<std::string> FilesUnder(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) out.push_back(e.path().string());
  }
  return out;
}

}  // namespace

int ConvertMain(int argc, char** argv) {
  ConvertFlags flags;
  bool help = false;
  if (Status st = ParseFlags(argc, argv, &flags, &help); !st.ok()) {
    std::fprintf(stderr, "memento-bench convert: %s\n%s", st.message().c_str(), kUsage);
    return kExitUsage;
  }
  if (help) {
    std::fputs(kUsage, stdout);
    return kExitOk;
  }
  const bool own_dir = flags.dir.empty();
  std::string dir = flags.dir;
  if (own_dir) {
    char tmpl[] = "/tmp/memento-bench-convert-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) {
      std::fprintf(stderr, "memento-bench convert: mkdtemp: %s\n", std::strerror(errno));
      return kExitFailed;
    }
    dir = tmpl;
  }
  const std::string src = dir + "/native", cp_out = dir + "/cp-copy", ucp_out = dir + "/ucp";
  RemoveOnFatalSignal(own_dir ? dir : src);
  auto cleanup = [&] {
    std::error_code ec;
    for (const std::string& p : {src, cp_out, ucp_out}) std::filesystem::remove_all(p, ec);
    if (own_dir) std::filesystem::remove_all(dir, ec);
  };
  std::vector<int64_t> shape;
  if (Status st = WriteSource(flags, src, &shape); !st.ok()) {
    std::fprintf(stderr, "memento-bench convert: writing the source checkpoint: %s\n", st.ToString().c_str());
    cleanup();
    return kExitFailed;
  }
  uint64_t source_bytes = 0;
  for (const std::string& f : FilesUnder(src)) source_bytes += std::filesystem::file_size(f);
  const std::string memento = ExecutableDir() + "/memento";
  Samples cp_s, convert_s;
  uint64_t peak_rss = 0, tensor_bytes = 0, largest = 0;
  for (int i = 0; i < flags.iters; ++i) {
    std::error_code ec;
    std::filesystem::remove_all(cp_out, ec);
    std::filesystem::remove_all(ucp_out, ec);
    // cp -r, then sync of the copied files: the conversion syncs what it writes.
    const auto cp_start = Clock::now();
    ChildRun cp = RunChild({"cp", "-r", src, cp_out}, dir + "/cp.log");
    std::vector<std::string> sync_args = {"sync"};
    for (const std::string& f : FilesUnder(cp_out)) sync_args.push_back(f);
    ChildRun sync = RunChild(sync_args, dir + "/sync.log");
    const double cp_seconds = Seconds(cp_start, Clock::now());
    if (cp.exit_code != 0 || sync.exit_code != 0) {
      std::fprintf(stderr, "memento-bench convert: cp/sync failed: %s%s\n", cp.output.c_str(), sync.output.c_str());
      cleanup();
      return kExitFailed;
    }
    std::filesystem::remove_all(cp_out, ec);
    ChildRun conv = RunChild({memento, "convert", "--json", "--threads", std::to_string(flags.threads), src, "--to",
                              "ucp", ucp_out},
                             dir + "/convert.log");
    if (conv.exit_code != 0) {
      std::fprintf(stderr, "memento-bench convert: %s failed (exit %d): %s\n", memento.c_str(), conv.exit_code,
                   conv.output.c_str());
      cleanup();
      return kExitFailed;
    }
    cp_s.Add(cp_seconds);
    convert_s.Add(conv.seconds);
    peak_rss = std::max(peak_rss, conv.max_rss_bytes);
    tensor_bytes = JsonNumber(conv.output, "tensor_bytes");
    largest = JsonNumber(conv.output, "largest_tensor_bytes");
  }
  const std::string fs_name = FileSystemName(dir);
  cleanup();

  const double cp_gbps = GBps(source_bytes, cp_s.Median());
  const double convert_gbps = GBps(source_bytes, convert_s.Median());
  const double ratio = cp_gbps > 0 ? convert_gbps / cp_gbps : 0;
  const uint64_t rss_goal = 2 * largest + kRssSlack;
  std::printf("convert: %d ranks (tp %d x dp %d), %d params of [%lld,%lld] x 3 states, %.1f MB on %s, %d threads, "
              "medians of %d\n",
              flags.tp * flags.dp, flags.tp, flags.dp, flags.params, static_cast<long long>(shape[0]),
              static_cast<long long>(shape[1]), static_cast<double>(source_bytes) / 1e6, fs_name.c_str(),
              flags.threads, flags.iters);
  std::printf("%-22s%7.2f GB/s   (%.1f ms)\n", "cp -r + sync:", cp_gbps, cp_s.Median() * 1e3);
  std::printf("%-22s%7.2f GB/s   (%.1f ms) ratio %.2f of cp (goal >= %.1f)%s\n", "memento convert:", convert_gbps,
              convert_s.Median() * 1e3, ratio, kGoalRatio, ratio >= kGoalRatio ? "" : "   BELOW GOAL");
  std::printf("%-22s%7.1f MiB     goal <= 2 x largest tensor (%.1f MiB) + 256 MiB = %.1f MiB%s\n", "peak RSS:",
              static_cast<double>(peak_rss) / (1 << 20), static_cast<double>(largest) / (1 << 20),
              static_cast<double>(rss_goal) / (1 << 20), peak_rss <= rss_goal ? "" : "   ABOVE GOAL");
  if (flags.json) {
    JsonLine j;
    j.Add("benchmark", "convert")
        .Add("ranks", flags.tp * flags.dp)
        .Add("params", flags.params)
        .Add("source_bytes", source_bytes)
        .Add("tensor_bytes", tensor_bytes)
        .Add("threads", flags.threads)
        .Add("cp_gbps", cp_gbps)
        .Add("convert_gbps", convert_gbps)
        .Add("ratio", ratio)
        .Add("goal_ratio", kGoalRatio)
        .Add("peak_rss_bytes", peak_rss)
        .Add("largest_tensor_bytes", largest)
        .Add("rss_goal_bytes", rss_goal)
        .Add("file_system", fs_name);
    std::printf("%s\n", j.str().c_str());
  }
  return kExitOk;
}

}  // namespace memento::bench
