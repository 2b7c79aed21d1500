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
#include "converters/torch_zip.h"
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
    "  --from F         source format: native (default) or deepspeed (a ZeRO-2 checkpoint of tp x dp\n"
    "                   written with memento's torch writer; memento convert --from deepspeed)\n"
    "  --json           end with one line of JSON holding every figure\n";

constexpr double kGoalRatio = 0.7;
constexpr double kGoalRatioDeepSpeed = 0.5;  // issue #6: unpickling, gathering and merging TP slices
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
  std::string from = "native";
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
    else if (n == "--from") {
      MEMENTO_RETURN_IF_ERROR(r.String(&f->from));
      if (f->from != "native" && f->from != "deepspeed") return InvalidArgument("--from: native or deepspeed, not '" + f->from + "'");
    }
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

// Writes a DeepSpeed ZeRO-2 checkpoint of tp x dp ranks (pp 1) in DeepSpeed's file structure:
// each parameter [rows, cols] split along dim 1 over TP (a row-parallel pattern), each TP rank's
// parameters flattened into one group, padded to a multiple of 2 x dp and cut into dp partitions.
// param_slice_mappings entries are DeepSpeed's fragment_address objects (numel, start).
Status WriteDeepSpeedSource(const ConvertFlags& f, const std::string& root, std::vector<int64_t>* shape) {
  FileSystem* fs = PosixFileSystem();
  const uint64_t per_param = std::max<uint64_t>(f.bytes / static_cast<uint64_t>(f.params) / 12, 1);
  const int64_t cols = 1024 * f.tp;
  const int64_t rows = std::max<int64_t>(1, static_cast<int64_t>(per_param) / cols);
  *shape = {rows, cols};
  const std::string tag = root + "/global_step1";
  MEMENTO_RETURN_IF_ERROR(fs->CreateDirs(tag));
  MEMENTO_RETURN_IF_ERROR(WriteFileAtomically(fs, root + "/latest", "global_step1"));
  const int64_t local = rows * (cols / f.tp);
  const int64_t total = local * f.params;
  const int64_t align = 2 * f.dp;
  const int64_t part = (total + align - 1) / align * align / f.dp;
  char mp_name[64];
  for (int t = 0; t < f.tp; ++t) {
    std::snprintf(mp_name, sizeof(mp_name), "%02d", t);
    PickleValuePtr shapes = PyDict(true);
    for (int p = 0; p < f.params; ++p) DictSet(shapes.get(), "layers." + std::to_string(p) + ".w", PyTuple({PyInt(rows), PyInt(cols / f.tp)}));
    PickleValuePtr uci = PyDict(false);
    DictSet(uci.get(), "parameter_with_row_parallelism_patterns", PyList({PyStr("layers\\.\\d+\\.w")}));
    PickleValuePtr ms = PyDict(false);
    DictSet(ms.get(), "module", PyNone());
    DictSet(ms.get(), "param_shapes", PyList({shapes}));
    DictSet(ms.get(), "iteration", PyInt(1));
    DictSet(ms.get(), "dp_world_size", PyInt(f.dp));
    DictSet(ms.get(), "mp_world_size", PyInt(f.tp));
    DictSet(ms.get(), "universal_checkpoint_info", uci);
    TorchFileBuilder mb;
    MEMENTO_RETURN_IF_ERROR(mb.Write(fs, tag + "/mp_rank_" + mp_name + "_model_states.pt", *ms));
    for (int d = 0; d < f.dp; ++d) {
      const int64_t lo = d * part, hi = std::min<int64_t>((d + 1) * part, total);
      TorchFileBuilder b;
      auto flat = [&](int64_t n, uint8_t fill) { return b.AddTensor(DType::kF32, {n}, std::vector<uint8_t>(static_cast<size_t>(n) * 4, fill)); };
      MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr fp32, flat(hi - lo, static_cast<uint8_t>(1 + t)));
      MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr m, flat(part, static_cast<uint8_t>(2 + t)));
      MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr v, flat(part, static_cast<uint8_t>(3 + t)));
      PickleValuePtr maps = PyDict(true);
      for (int p = 0; p < f.params; ++p) {
        const int64_t a = std::max(lo, p * local), e = std::min(hi, (p + 1) * local);
        if (a >= e) continue;
        PickleValuePtr fa = PyDataclass("deepspeed.utils.tensor_fragment.fragment_address");
        DictSet(fa.get(), "numel", PyInt(e - a));
        DictSet(fa.get(), "start", PyInt(a - lo));
        DictSet(maps.get(), "layers." + std::to_string(p) + ".w", fa);
      }
      PickleValuePtr st = PyDict(false);
      DictSet(st.get(), "step", PyFloat(1));
      DictSet(st.get(), "exp_avg", m);
      DictSet(st.get(), "exp_avg_sq", v);
      PickleValuePtr state = PyDict(false);
      state->entries.emplace_back(PyInt(0), st);
      PickleValuePtr base = PyDict(false);
      DictSet(base.get(), "state", state);
      PickleValuePtr osd = PyDict(false);
      DictSet(osd.get(), "base_optimizer_state", base);
      DictSet(osd.get(), "single_partition_of_fp32_groups", PyList({fp32}));
      DictSet(osd.get(), "param_slice_mappings", PyList({maps}));
      DictSet(osd.get(), "zero_stage", PyInt(2));
      DictSet(osd.get(), "partition_count", PyList({PyInt(f.dp)}));
      DictSet(osd.get(), "group_paddings", PyList({PyInt(d == f.dp - 1 ? part - (hi - lo) : 0)}));
      PickleValuePtr top = PyDict(false);
      DictSet(top.get(), "optimizer_state_dict", osd);
      MEMENTO_RETURN_IF_ERROR(b.Write(fs, tag + "/zero_pp_rank_" + std::to_string(d) + "_mp_rank_" + mp_name + "_optim_states.pt", *top));
    }
  }
  return Status::Ok();
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
  const bool deepspeed = flags.from == "deepspeed";
  if (Status st = deepspeed ? WriteDeepSpeedSource(flags, src, &shape) : WriteSource(flags, src, &shape); !st.ok()) {
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
    std::vector<std::string> conv_args = {memento, "convert", "--json", "--threads", std::to_string(flags.threads)};
    if (deepspeed) conv_args.insert(conv_args.end(), {"--from", "deepspeed"});
    conv_args.insert(conv_args.end(), {src, "--to", "ucp", ucp_out});
    ChildRun conv = RunChild(conv_args, dir + "/convert.log");
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
  const double goal_ratio = deepspeed ? kGoalRatioDeepSpeed : kGoalRatio;
  const uint64_t rss_goal = 2 * largest + kRssSlack;
  if (deepspeed) std::printf("source: DeepSpeed ZeRO-2 checkpoint (memento convert --from deepspeed)\n");
  std::printf("convert: %d ranks (tp %d x dp %d), %d params of [%lld,%lld] x 3 states, %.1f MB on %s, %d threads, "
              "medians of %d\n",
              flags.tp * flags.dp, flags.tp, flags.dp, flags.params, static_cast<long long>(shape[0]),
              static_cast<long long>(shape[1]), static_cast<double>(source_bytes) / 1e6, fs_name.c_str(),
              flags.threads, flags.iters);
  std::printf("%-22s%7.2f GB/s   (%.1f ms)\n", "cp -r + sync:", cp_gbps, cp_s.Median() * 1e3);
  std::printf("%-22s%7.2f GB/s   (%.1f ms) ratio %.2f of cp (goal >= %.1f)%s\n", "memento convert:", convert_gbps,
              convert_s.Median() * 1e3, ratio, goal_ratio, ratio >= goal_ratio ? "" : "   BELOW GOAL");
  std::printf("%-22s%7.1f MiB     goal <= 2 x largest tensor (%.1f MiB) + 256 MiB = %.1f MiB%s\n", "peak RSS:",
              static_cast<double>(peak_rss) / (1 << 20), static_cast<double>(largest) / (1 << 20),
              static_cast<double>(rss_goal) / (1 << 20), peak_rss <= rss_goal ? "" : "   ABOVE GOAL");
  if (flags.json) {
    JsonLine j;
    j.Add("benchmark", deepspeed ? "convert-deepspeed" : "convert")
        .Add("ranks", flags.tp * flags.dp)
        .Add("params", flags.params)
        .Add("source_bytes", source_bytes)
        .Add("tensor_bytes", tensor_bytes)
        .Add("threads", flags.threads)
        .Add("cp_gbps", cp_gbps)
        .Add("convert_gbps", convert_gbps)
        .Add("ratio", ratio)
        .Add("goal_ratio", goal_ratio)
        .Add("peak_rss_bytes", peak_rss)
        .Add("largest_tensor_bytes", largest)
        .Add("rss_goal_bytes", rss_goal)
        .Add("file_system", fs_name);
    std::printf("%s\n", j.str().c_str());
  }
  return kExitOk;
}

}  // namespace memento::bench
