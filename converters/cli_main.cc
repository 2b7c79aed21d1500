// memento: the operator's view of persisted checkpoints (docs/formats/native-checkpoint.md):
// `ls` lists them, `inspect` shows one's manifest, tensors and blobs, `verify` re-reads every byte
// and checks every CRC. Text for people, `--json` (one object on stdout) for scripts.
// Exit status: 0 success, 1 failure (missing or damaged input, problems found), 2 usage error.
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <iterator>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "converters/deepspeed.h"
#include "converters/diff.h"
#include "converters/json_writer.h"
#include "converters/safetensors_export.h"
#include "core/dtype.h"
#include "core/file_system.h"
#include "core/shard.h"
#include "core/status.h"
#include "ucp_format/native_checkpoint.h"
#include "ucp_format/pattern_spec.h"
#include "ucp_format/universal.h"

namespace memento {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

constexpr char kUsage[] =
    "usage: memento <command> [--json] <path>\n"
    "\n"
    "Inspect checkpoints persisted by memento agents (<root>/<job>/step-<N>/).\n"
    "\n"
    "commands:\n"
    "  ls <root>|<root>/<job>   list checkpoints: job, step, state, size, ranks\n"
    "  inspect <checkpoint>     a checkpoint's manifest, tensors and blobs\n"
    "  verify <checkpoint>      re-read every byte and check every CRC\n"
    "  convert <checkpoint> --to ucp <out>\n"
    "                           consolidate into a universal checkpoint (safetensors)\n"
    "  convert --from deepspeed|torch|safetensors|memento <src>\n"
    "          --to ucp|deepspeed-universal|safetensors <out>\n"
    "                           convert between memento and the ecosystem's formats\n"
    "  diff <A> <B>             compare two checkpoints tensor by tensor\n"
    "\n"
    "options:\n"
    "  --json       print a single JSON object on stdout\n"
    "  -h, --help   this help; `memento <command> --help` for a command's\n"
    "\n"
    "exit status: 0 success, 1 failure (missing or damaged input, problems found), 2 usage error\n";

constexpr char kLsHelp[] =
    "usage: memento ls [--json] <root>|<root>/<job>\n"
    "\n"
    "Lists the checkpoints (step-<N> directories) of one job, or of every job under a root, oldest\n"
    "first: job, step, state (committed: the manifest is there and valid; partial: it is not, so the\n"
    "directory is not a checkpoint), size (data bytes) and ranks.\n";

constexpr char kInspectHelp[] =
    "usage: memento inspect [--json] <root>/<job>/step-<N>\n"
    "\n"
    "Prints a committed checkpoint's manifest (job, step, world size, creation time, total bytes),\n"
    "then one row per tensor: dtype, global shape, fragments across ranks (written: replica 0,\n"
    "persisted; replicas: data-parallel copies, not persisted), bytes persisted, and the CRC (the\n"
    "CRC-64 when the tensor is one chunk, else the number of chunks); then one row per blob and rank.\n"
    "Reads only the metadata; `memento verify` reads the data.\n";

constexpr char kVerifyHelp[] =
    "usage: memento verify [--json] <root>/<job>/step-<N>\n"
    "\n"
    "Re-reads every byte of a committed checkpoint and checks every CRC: the manifest, each rank's\n"
    "metadata, each run of each tensor and blob. Prints each problem (file, tensor, byte range, what)\n"
    "and exits 1 when there is any; prints \"OK: ...\" and exits 0 when the checkpoint is intact.\n"
    "A universal checkpoint (a directory with manifest.pb, from `memento convert`) is checked the\n"
    "same way: every tensor and blob against its safetensors header and its CRC in the manifest.\n";

constexpr char kConvertHelp[] =
    "usage: memento convert [--json] [--threads N] [--pattern FILE] <root>/<job>/step-<N> --to ucp <out>\n"
    "       memento convert [--json] --from FORMAT <src> --to FORMAT <out> [--dtype T] [--shard-gb N]\n"
    "\n"
    "--from: memento (default; a native or universal checkpoint), deepspeed (a DeepSpeed ZeRO 1/2/3\n"
    "checkpoint directory, any TP x PP x DP; docs/formats/ecosystem.md), torch (a torch.save file of\n"
    "named tensors), safetensors (a file, or a directory of them). --to: ucp (a universal checkpoint),\n"
    "deepspeed-universal (DeepSpeed's universal layout; also writes <parent>/latest_universal),\n"
    "safetensors (model weights; --dtype bf16|fp16|fp32 casts, --shard-gb N splits into files of at\n"
    "most N GB with model.safetensors.index.json). Pickles are read without running any code.\n"
    "\n"
    "Consolidates a committed native checkpoint of any layout (TP x PP x DP, ZeRO flat partitions,\n"
    "fused sub-parameters, uneven splits, vocab padding) into a universal checkpoint at <out>, which\n"
    "must not exist: per parameter, its value and every optimizer state at the full logical shape in\n"
    "<out>/params/<param>.safetensors, per-rank blobs in <out>/blobs.safetensors, and a manifest\n"
    "(manifest.pb, manifest.json). Streams in slabs: memory stays bounded by a few slabs per thread.\n"
    "Every byte read is CRC-checked; the result is committed by renaming a temporary directory.\n"
    "\n"
    "options:\n"
    "  --to ucp        the target format (the only one so far)\n"
    "  --threads N     parameters converted in parallel (default 4)\n"
    "  --slab-mib M    consolidation slab per thread, MiB (default 16)\n"
    "  --pattern FILE  a pattern spec (textproto, docs/formats/universal-checkpoint.md) for layouts\n"
    "                  whose metadata is partial, and the optimizer-state naming rule\n"
    "  --json          print a single JSON summary object on stdout\n"
    "  --from FORMAT   memento, deepspeed, torch or safetensors (default memento)\n"
    "  --tag TAG       deepspeed: the checkpoint tag (default: the `latest` file's)\n"
    "  --tp N          deepspeed: tensor-parallel degree when the files do not say it\n"
    "  --dtype T       safetensors: cast floating-point tensors to bf16, fp16 or fp32\n"
    "  --shard-gb N    safetensors: files of at most N GB (decimal fractions allowed)\n";

constexpr char kDiffHelp[] =
    "usage: memento diff [--json] [--atol X] [--rtol X] <A> <B>\n"
    "\n"
    "Compares two checkpoints tensor by tensor: universal checkpoints (value \"<param>\", other\n"
    "states \"<param>.<state>\"), DeepSpeed universal layouts (same names), committed native\n"
    "checkpoints (their tensor names; each tensor consolidated from every rank's shards, vocab\n"
    "padding cut), safetensors files or directories, torch.save files. Prints, per tensor, the\n"
    "largest absolute and relative difference.\n"
    "Two tensors differ when some element has |a - b| > atol + rtol x |b| (defaults 0), when their\n"
    "shapes differ, or when only one side has the tensor.\n"
    "\n"
    "exit status: 0 no tensor differs, 1 some differ (or an input cannot be read), 2 usage error\n";

struct Args {
  std::string command;
  std::string path;
  bool json = false;
};

std::string HumanBytes(uint64_t bytes) {
  if (bytes < 1024) return std::to_string(bytes) + " B";
  static const char* const kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes) / 1024;
  size_t unit = 0;
  while (v >= 1024 && unit + 1 < std::size(kUnits)) {
    v /= 1024;
    ++unit;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f %s", v, kUnits[unit]);
  return buf;
}

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%016" PRIx64, v);
  return buf;
}

// "2024-06-01T12:00:00.123Z"
std::string IsoTime(int64_t unix_ms) {
  const time_t seconds = static_cast<time_t>(unix_ms / 1000);
  struct tm tm {};
  if (gmtime_r(&seconds, &tm) == nullptr) return std::to_string(unix_ms) + " ms";
  char date[32];
  if (std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%S", &tm) == 0) return std::to_string(unix_ms) + " ms";
  char millis[8];
  std::snprintf(millis, sizeof(millis), ".%03dZ", static_cast<int>(((unix_ms % 1000) + 1000) % 1000));
  return std::string(date) + millis;
}

std::string Basename(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string Join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

// Left-aligned columns two spaces apart; no trailing spaces.
std::string Table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& row : rows) {
    if (width.size() < row.size()) width.resize(row.size(), 0);
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line += std::string(width[c] - row[c].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

// Prints a failure of `command` (stderr as text, or a JSON object on stdout); returns exit 1.
int Fail(const Args& args, const Status& status) {
  if (args.json) {
    JsonWriter j;
    j.BeginObject().Key("error").String(status.message()).Key("code").String(StatusCodeName(status.code())).EndObject();
    std::printf("%s\n", j.str().c_str());
  } else {
    std::fprintf(stderr, "memento %s: %s\n", args.command.c_str(), status.message().c_str());
  }
  return kExitFailure;
}

// OK when `path` is a directory we can list; otherwise a Status naming it.
Status CheckDirectory(FileSystem* fs, const std::string& path) {
  Result<std::vector<std::string>> names = fs->ListDir(path);
  if (names.ok()) return Status::Ok();
  if (!fs->Exists(path)) return NotFound(path + ": no such directory");
  return names.status();
}

int Ls(const Args& args) {
  FileSystem* fs = PosixFileSystem();
  Status st = CheckDirectory(fs, args.path);
  if (!st.ok()) return Fail(args, st);

  struct Row {
    std::string job;
    CheckpointInfo info;
  };
  std::vector<Row> rows;
  Result<std::vector<CheckpointInfo>> own = ListCheckpoints(fs, args.path);
  if (!own.ok()) return Fail(args, own.status());
  if (!own->empty()) {
    for (CheckpointInfo& info : *own) rows.push_back({Basename(args.path), std::move(info)});
  } else {
    Result<std::vector<std::string>> jobs = fs->ListDir(args.path);
    if (!jobs.ok()) return Fail(args, jobs.status());
    for (const std::string& job : *jobs) {
      Result<std::vector<CheckpointInfo>> list = ListCheckpoints(fs, Join(args.path, job));
      if (!list.ok()) continue;  // not a directory
      for (CheckpointInfo& info : *list) rows.push_back({job, std::move(info)});
    }
  }

  if (args.json) {
    JsonWriter j;
    j.BeginObject().Key("path").String(args.path).Key("checkpoints").BeginArray();
    for (const Row& r : rows) {
      j.BeginObject()
          .Key("job").String(r.job)
          .Key("step").Int(r.info.step)
          .Key("dir").String(r.info.dir)
          .Key("state").String(r.info.committed ? "committed" : "partial")
          .Key("bytes").Uint(r.info.bytes)
          .Key("ranks").Int(r.info.ranks);
      if (!r.info.committed) j.Key("reason").String(r.info.uncommitted_reason);
      j.EndObject();
    }
    j.EndArray().EndObject();
    std::printf("%s\n", j.str().c_str());
    return kExitOk;
  }
  if (rows.empty()) {
    std::printf("no checkpoints under %s\n", args.path.c_str());
    return kExitOk;
  }
  std::vector<std::vector<std::string>> table = {{"JOB", "STEP", "STATE", "SIZE", "RANKS"}};
  for (const Row& r : rows) {
    table.push_back({r.job, std::to_string(r.info.step), r.info.committed ? "committed" : "partial",
                     HumanBytes(r.info.bytes), std::to_string(r.info.ranks)});
  }
  std::fputs(Table(table).c_str(), stdout);
  return kExitOk;
}

// One tensor across all ranks of a checkpoint.
struct TensorSummary {
  std::string name;
  int32_t dtype = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> original_shape;
  int64_t fragments = 0;
  int64_t written = 0;
  int64_t replicas = 0;
  uint64_t bytes = 0;
  uint64_t chunks = 0;
  uint64_t first_crc = 0;
};

std::string CrcCell(uint64_t chunks, uint64_t first_crc) {
  if (chunks == 0) return "-";
  if (chunks == 1) return Hex(first_crc);
  return std::to_string(chunks) + " chunks";
}

std::string FragmentsCell(const TensorSummary& t) {
  std::string s = std::to_string(t.fragments) + " (" + std::to_string(t.written) + " written";
  if (t.replicas > 0) s += ", " + std::to_string(t.replicas) + (t.replicas == 1 ? " replica" : " replicas");
  return s + ")";
}

int Inspect(const Args& args) {
  FileSystem* fs = PosixFileSystem();
  Status st = CheckDirectory(fs, args.path);
  if (!st.ok()) return Fail(args, st);
  Result<proto::Manifest> manifest = ReadManifest(fs, args.path);
  if (!manifest.ok()) return Fail(args, manifest.status());
  const proto::Manifest& m = *manifest;

  std::vector<TensorSummary> tensors;
  std::map<std::string, size_t> index;
  struct BlobRow {
    int32_t rank;
    proto::PersistedBlob blob;
  };
  std::vector<BlobRow> blobs;
  for (int32_t r = 0; r < m.world_size(); ++r) {
    Result<proto::RankMetadata> meta = ReadRankMetadata(fs, args.path, m, r);
    if (!meta.ok()) return Fail(args, meta.status());
    for (const proto::PersistedTensor& pt : meta->tensors()) {
      auto [it, inserted] = index.emplace(pt.name(), tensors.size());
      if (inserted) {
        TensorSummary t;
        t.name = pt.name();
        t.dtype = pt.dtype();
        t.shape.assign(pt.spec().global_shape().begin(), pt.spec().global_shape().end());
        t.original_shape.assign(pt.spec().original_shape().begin(), pt.spec().original_shape().end());
        tensors.push_back(std::move(t));
      }
      TensorSummary& t = tensors[it->second];
      t.fragments += pt.spec().fragments_size();
      for (const proto::FragmentProto& f : pt.spec().fragments()) t.replicas += f.replica_id() != 0 ? 1 : 0;
      for (const proto::PersistedRun& run : pt.runs()) {
        if (t.chunks == 0 && run.chunk_crcs_size() > 0) t.first_crc = run.chunk_crcs(0);
        t.written += 1;
        t.bytes += run.bytes();
        t.chunks += static_cast<uint64_t>(run.chunk_crcs_size());
      }
    }
    for (const proto::PersistedBlob& b : meta->blobs()) blobs.push_back({r, b});
  }

  if (args.json) {
    JsonWriter j;
    j.BeginObject()
        .Key("dir").String(args.path)
        .Key("job").String(m.job_id())
        .Key("step").Int(m.step())
        .Key("world_size").Int(m.world_size())
        .Key("created_unix_ms").Int(m.created_unix_ms())
        .Key("created").String(IsoTime(m.created_unix_ms()))
        .Key("total_bytes").Uint(m.total_bytes())
        .Key("format_version").Uint(m.format_version())
        .Key("library_version").String(m.library_version());
    j.Key("ranks").BeginArray();
    for (const proto::ManifestRank& r : m.ranks()) {
      j.BeginObject()
          .Key("rank").Int(r.rank())
          .Key("data_file").String(r.data_file())
          .Key("data_bytes").Uint(r.data_bytes())
          .Key("meta_file").String(r.meta_file())
          .Key("meta_crc").String(Hex(r.meta_crc()))
          .EndObject();
    }
    j.EndArray().Key("tensors").BeginArray();
    for (const TensorSummary& t : tensors) {
      j.BeginObject().Key("name").String(t.name).Key("dtype").String(DTypeName(static_cast<DType>(t.dtype)));
      j.Key("shape").BeginArray();
      for (int64_t d : t.shape) j.Int(d);
      j.EndArray();
      if (!t.original_shape.empty()) {
        j.Key("original_shape").BeginArray();
        for (int64_t d : t.original_shape) j.Int(d);
        j.EndArray();
      }
      j.Key("fragments").Int(t.fragments).Key("written").Int(t.written).Key("replicas").Int(t.replicas);
      j.Key("bytes").Uint(t.bytes).Key("chunks").Uint(t.chunks).Key("crc");
      if (t.chunks == 1) {
        j.String(Hex(t.first_crc));
      } else {
        j.Null();
      }
      j.EndObject();
    }
    j.EndArray().Key("blobs").BeginArray();
    for (const BlobRow& b : blobs) {
      j.BeginObject()
          .Key("name").String(b.blob.name())
          .Key("rank").Int(b.rank)
          .Key("bytes").Uint(b.blob.run().bytes())
          .Key("chunks").Uint(static_cast<uint64_t>(b.blob.run().chunk_crcs_size()))
          .Key("crc");
      if (b.blob.run().chunk_crcs_size() == 1) {
        j.String(Hex(b.blob.run().chunk_crcs(0)));
      } else {
        j.Null();
      }
      j.EndObject();
    }
    j.EndArray().EndObject();
    std::printf("%s\n", j.str().c_str());
    return kExitOk;
  }

  std::string out = Table({{"checkpoint", args.path},
                           {"job", m.job_id()},
                           {"step", std::to_string(m.step())},
                           {"world size", std::to_string(m.world_size())},
                           {"created", IsoTime(m.created_unix_ms())},
                           {"total bytes", std::to_string(m.total_bytes()) + " (" + HumanBytes(m.total_bytes()) + ")"},
                           {"format", std::to_string(m.format_version()) + " (memento " + m.library_version() + ")"}});
  std::vector<std::vector<std::string>> rows = {{"TENSOR", "DTYPE", "SHAPE", "FRAGMENTS", "BYTES", "CRC"}};
  for (const TensorSummary& t : tensors) {
    std::string shape = ShapeString(t.shape);
    if (!t.original_shape.empty()) shape += " (unpadded " + ShapeString(t.original_shape) + ")";
    rows.push_back({t.name, std::string(DTypeName(static_cast<DType>(t.dtype))), shape, FragmentsCell(t),
                    std::to_string(t.bytes), CrcCell(t.chunks, t.first_crc)});
  }
  out += "\n" + Table(rows);
  if (!blobs.empty()) {
    std::vector<std::vector<std::string>> blob_rows = {{"BLOB", "RANK", "BYTES", "CRC"}};
    for (const BlobRow& b : blobs) {
      const proto::PersistedRun& run = b.blob.run();
      blob_rows.push_back({b.blob.name(), std::to_string(b.rank), std::to_string(run.bytes()),
                           CrcCell(static_cast<uint64_t>(run.chunk_crcs_size()),
                                   run.chunk_crcs_size() > 0 ? run.chunk_crcs(0) : 0)});
    }
    out += "\n" + Table(blob_rows);
  }
  std::fputs(out.c_str(), stdout);
  return kExitOk;
}

// A progress line on a terminal, for verifications that take more than a second.
class ProgressLine {
 public:
  explicit ProgressLine(bool enabled) : enabled_(enabled), start_(std::chrono::steady_clock::now()) {}
  ~ProgressLine() { Clear(); }

  void Clear() {
    if (shown_) std::fputs("\r\033[K", stderr);
    shown_ = false;
  }

  void Update(uint64_t done, uint64_t total) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (now - start_ < std::chrono::seconds(1) || now - last_ < std::chrono::milliseconds(250)) return;
    last_ = now;
    shown_ = true;
    const double pct = total == 0 ? 100.0 : 100.0 * static_cast<double>(done) / static_cast<double>(total);
    std::fprintf(stderr, "\r\033[Kverifying: %.0f%% (%s of %s)", pct, HumanBytes(done).c_str(),
                 HumanBytes(total).c_str());
    std::fflush(stderr);
  }

 private:
  bool enabled_;
  bool shown_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_{};
};

// `memento verify` of a universal checkpoint.
int VerifyUniversalDir(const Args& args, FileSystem* fs) {
  Result<std::vector<std::string>> problems = VerifyUniversal(fs, args.path);
  if (!problems.ok()) return Fail(args, problems.status());
  const bool ok = problems->empty();
  if (args.json) {
    JsonWriter j;
    j.BeginObject().Key("dir").String(args.path).Key("format").String("ucp").Key("ok").Bool(ok).Key("problems").BeginArray();
    for (const std::string& p : *problems) j.String(p);
    j.EndArray().EndObject();
    std::printf("%s\n", j.str().c_str());
    return ok ? kExitOk : kExitFailure;
  }
  for (const std::string& p : *problems) std::printf("%s\n", p.c_str());
  if (!ok) {
    std::printf("FAILED: %zu problem%s in %s\n", problems->size(), problems->size() == 1 ? "" : "s", args.path.c_str());
    return kExitFailure;
  }
  std::printf("OK: universal checkpoint %s intact\n", args.path.c_str());
  return kExitOk;
}

int Verify(const Args& args) {
  FileSystem* fs = PosixFileSystem();
  Status st = CheckDirectory(fs, args.path);
  if (!st.ok()) return Fail(args, st);
  if (fs->Exists(Join(args.path, kUniversalManifestName))) return VerifyUniversalDir(args, fs);
  VerifyStats stats;
  ProgressLine progress(!args.json && ::isatty(STDERR_FILENO) == 1);
  Result<std::vector<VerifyProblem>> problems = VerifyCheckpoint(
      fs, args.path, &stats, [&](uint64_t done, uint64_t total) { progress.Update(done, total); });
  progress.Clear();
  if (!problems.ok()) return Fail(args, problems.status());
  const bool ok = problems->empty();

  if (args.json) {
    JsonWriter j;
    j.BeginObject()
        .Key("dir").String(args.path)
        .Key("ok").Bool(ok)
        .Key("tensors").Int(stats.tensors)
        .Key("blobs").Int(stats.blobs)
        .Key("bytes_verified").Uint(stats.bytes)
        .Key("problems").BeginArray();
    for (const VerifyProblem& p : *problems) {
      j.BeginObject().Key("file").String(p.file);
      if (!p.tensor.empty()) {
        j.Key(p.blob ? "blob" : "tensor").String(p.tensor);
        if (p.fragment >= 0) j.Key("fragment").Int(p.fragment);
        j.Key("begin").Uint(p.begin).Key("end").Uint(p.end);
      }
      j.Key("what").String(p.what).Key("message").String(p.ToString()).EndObject();
    }
    j.EndArray().EndObject();
    std::printf("%s\n", j.str().c_str());
    return ok ? kExitOk : kExitFailure;
  }
  for (const VerifyProblem& p : *problems) std::printf("%s\n", p.ToString().c_str());
  if (!ok) {
    std::printf("FAILED: %zu problem%s in %s\n", problems->size(), problems->size() == 1 ? "" : "s",
                args.path.c_str());
    return kExitFailure;
  }
  std::printf("OK: %" PRId64 " tensors, %" PRId64 " blobs, %" PRIu64 " bytes verified\n", stats.tensors, stats.blobs,
              stats.bytes);
  return kExitOk;
}

// A progress bar on stderr for `convert`, only on a terminal.
class ConvertProgress {
 public:
  explicit ConvertProgress(bool enabled) : enabled_(enabled), start_(std::chrono::steady_clock::now()) {}
  void Update(uint64_t done, uint64_t total) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (done < total && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    shown_ = true;
    const double frac = total == 0 ? 1.0 : static_cast<double>(done) / static_cast<double>(total);
    const int filled = static_cast<int>(frac * 30);
    const double secs = std::chrono::duration<double>(now - start_).count();
    std::string bar(static_cast<size_t>(filled), '#');
    bar.append(static_cast<size_t>(30 - filled), '.');
    std::fprintf(stderr, "\r\033[Kconverting [%s] %3.0f%% %s of %s, %s/s", bar.c_str(), frac * 100,
                 HumanBytes(done).c_str(), HumanBytes(total).c_str(),
                 HumanBytes(secs > 0 ? static_cast<uint64_t>(static_cast<double>(done) / secs) : 0).c_str());
    std::fflush(stderr);
  }
  void Clear() {
    if (shown_) std::fprintf(stderr, "\r\033[K");
    shown_ = false;
  }

 private:
  bool enabled_;
  bool shown_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_{};
};

int ConvertEcosystem(const Args& args, const std::string& from, const std::string& to, const std::string& out,
                     ConvertOptions options, DeepSpeedImportOptions ds, const SafetensorsExportOptions& st);

int Convert(int argc, char** argv) {
  Args args;
  args.command = "convert";
  std::string to, out;
  std::string from = "memento";
  std::string pattern_path;
  ConvertOptions options;
  DeepSpeedImportOptions ds;
  SafetensorsExportOptions export_st;
  std::vector<std::string> positional;
  auto usage = [&](const std::string& message) {
    std::fprintf(stderr, "memento convert: %s\n%s", message.c_str(), kConvertHelp);
    return kExitUsage;
  };
  auto number = [](const std::string& text, int64_t* v) {
    char* end = nullptr;
    *v = std::strtoll(text.c_str(), &end, 10);
    return !text.empty() && end != nullptr && *end == '\0' && *v > 0;
  };
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](std::string* v) {
      if (i + 1 >= argc) return false;
      *v = argv[++i];
      return true;
    };
    std::string v;
    int64_t n = 0;
    if (a == "-h" || a == "--help") {
      std::fputs(kConvertHelp, stdout);
      return kExitOk;
    } else if (a == "--json") {
      args.json = true;
    } else if (a == "--to") {
      if (!value(&to)) return usage("--to needs a format");
    } else if (a == "--from") {
      if (!value(&from)) return usage("--from needs a format");
    } else if (a == "--tag") {
      if (!value(&ds.tag)) return usage("--tag needs a tag");
    } else if (a == "--tp") {
      if (!value(&v) || !number(v, &n) || n > 65536) return usage("--tp needs a positive integer");
      ds.tp = static_cast<int>(n);
    } else if (a == "--dtype") {
      if (!value(&v)) return usage("--dtype needs bf16, fp16 or fp32");
      if (v == "bf16") export_st.dtype = DType::kBF16;
      else if (v == "fp16") export_st.dtype = DType::kF16;
      else if (v == "fp32") export_st.dtype = DType::kF32;
      else return usage("--dtype needs bf16, fp16 or fp32, not '" + v + "'");
    } else if (a == "--shard-gb") {
      char* end = nullptr;
      if (!value(&v)) return usage("--shard-gb needs a size in GB");
      const double gb = std::strtod(v.c_str(), &end);
      if (end == nullptr || *end != '\0' || !(gb > 0) || gb > 1e6) return usage("--shard-gb needs a positive size in GB");
      export_st.shard_bytes = static_cast<uint64_t>(gb * 1e9);
    } else if (a == "--pattern") {
      if (!value(&pattern_path)) return usage("--pattern needs a file");
    } else if (a == "--threads") {
      if (!value(&v) || !number(v, &n) || n > 1024) return usage("--threads needs an integer in 1..1024");
      options.threads = static_cast<int>(n);
    } else if (a == "--slab-mib") {
      if (!value(&v) || !number(v, &n) || n > (1 << 20)) return usage("--slab-mib needs a positive integer");
      options.slab_bytes = static_cast<uint64_t>(n) << 20;
    } else if (a.size() > 1 && a[0] == '-') {
      return usage("unknown option '" + a + "'");
    } else {
      positional.push_back(a);
    }
  }
  if (to.empty()) return usage("--to is required");
  if (to != "ucp" && to != "deepspeed-universal" && to != "safetensors") {
    return usage("unknown target format '" + to + "' (supported: ucp, deepspeed-universal, safetensors)");
  }
  if (from != "memento" && from != "deepspeed" && from != "torch" && from != "safetensors") {
    return usage("unknown source format '" + from + "' (supported: memento, deepspeed, torch, safetensors)");
  }
  if (positional.size() != 2) return usage("expected <checkpoint> and <out>");
  args.path = positional[0];
  out = positional[1];
  if (from != "memento" || to != "ucp" || PosixFileSystem()->Exists(Join(args.path, kUniversalManifestName))) {
    return ConvertEcosystem(args, from, to, out, options, ds, export_st);
  }
  FileSystem* fs = PosixFileSystem();
  Status st = CheckDirectory(fs, args.path);
  if (!st.ok()) return Fail(args, st);
  PatternSpec pattern;
  if (!pattern_path.empty()) {
    Result<PatternSpec> p = PatternSpec::FromFile(fs, pattern_path);
    if (!p.ok()) return Fail(args, p.status());
    pattern = std::move(p).value();
    options.pattern = &pattern;
  }
  ConvertProgress progress(!args.json && ::isatty(STDERR_FILENO) == 1);
  options.progress = [&](uint64_t done, uint64_t total) { progress.Update(done, total); };
  Result<ConvertSummary> summary = ConvertNativeToUniversal(fs, args.path, out, options);
  progress.Clear();
  if (!summary.ok()) return Fail(args, summary.status());
  const ConvertSummary& s = *summary;
  const double rate = s.seconds > 0 ? static_cast<double>(s.tensor_bytes) / s.seconds : 0;
  if (args.json) {
    JsonWriter j;
    j.BeginObject()
        .Key("source").String(args.path)
        .Key("out").String(s.out_dir)
        .Key("format").String("ucp")
        .Key("step").Int(s.step)
        .Key("source_world_size").Int(s.source_world_size)
        .Key("params").Int(s.params)
        .Key("tensors").Int(s.tensors)
        .Key("blobs").Int(s.blobs)
        .Key("tensor_bytes").Uint(s.tensor_bytes)
        .Key("bytes_read").Uint(s.bytes_read)
        .Key("largest_tensor_bytes").Uint(s.largest_tensor_bytes)
        .Key("threads").Int(options.threads)
        .Key("seconds").Double(s.seconds)
        .Key("bytes_per_second").Double(rate, 0)
        .EndObject();
    std::printf("%s\n", j.str().c_str());
    return kExitOk;
  }
  std::printf("converted %s (step %" PRId64 ", %d ranks) to %s: %" PRId64 " parameters, %" PRId64
              " tensors, %" PRId64 " blobs, %s in %.2f s (%s/s)\n",
              args.path.c_str(), s.step, s.source_world_size, s.out_dir.c_str(), s.params, s.tensors, s.blobs,
              HumanBytes(s.tensor_bytes).c_str(), s.seconds, HumanBytes(static_cast<uint64_t>(rate)).c_str());
  return kExitOk;
}

// `convert` for every pair but native -> ucp: the source goes to a universal checkpoint (the
// output itself for --to ucp, else a temporary one next to the output), which is then exported.
int ConvertEcosystem(const Args& args, const std::string& from, const std::string& to, const std::string& out,
                     ConvertOptions options, DeepSpeedImportOptions ds, const SafetensorsExportOptions& st) {
  FileSystem* fs = PosixFileSystem();
  if (fs->Exists(out)) return Fail(args, AlreadyExists(out + " already exists; the conversion needs a new path"));
  // Tensors of a few MiB are allocated and freed over and over: keep them off mmap (whose fresh
  // pages fault on first touch) and keep freed memory for the next one.
  ::mallopt(M_MMAP_THRESHOLD, 64 << 20);
  ::mallopt(M_TRIM_THRESHOLD, 128 << 20);
  ConvertProgress progress(!args.json && ::isatty(STDERR_FILENO) == 1);
  options.progress = [&](uint64_t done, uint64_t total) { progress.Update(done, total); };
  ds.convert = options;
  const auto started = std::chrono::steady_clock::now();
  std::string ucp = out;
  std::string tmp_ucp;
  const bool is_universal = from == "memento" && fs->Exists(Join(args.path, kUniversalManifestName));
  if (to != "ucp" || is_universal) {
    std::string parent = out;
    while (parent.size() > 1 && parent.back() == '/') parent.pop_back();
    const size_t slash = parent.rfind('/');
    parent = slash == std::string::npos ? "." : parent.substr(0, slash == 0 ? 1 : slash);
    tmp_ucp = Join(parent, "." + Basename(out) + ".ucp-" + std::to_string(::getpid()));
    ucp = tmp_ucp;
  }
  JsonWriter j;
  j.BeginObject().Key("source").String(args.path).Key("from").String(from).Key("out").String(out).Key("to").String(to);
  std::string text;
  Status st_result;
  auto cleanup = [&]() {
    if (!tmp_ucp.empty()) fs->RemoveAll(tmp_ucp).IgnoreError();
  };
  // Step 1: a universal checkpoint.
  if (is_universal) {
    if (to == "ucp") return Fail(args, InvalidArgument(args.path + " is already a universal checkpoint"));
    ucp = args.path;
    tmp_ucp.clear();
  } else if (from == "deepspeed") {
    Result<DeepSpeedImportSummary> s = ImportDeepSpeed(fs, args.path, ucp, ds);
    if (!s.ok()) { progress.Clear(); cleanup(); return Fail(args, s.status()); }
    j.Key("tp").Int(s->tp).Key("pp").Int(s->pp).Key("dp").Int(s->dp).Key("zero_stage").Int(s->zero_stage)
        .Key("params").Int(s->params).Key("iteration").Int(s->iteration);
    j.Key("unmatched_patterns").BeginArray();
    for (const std::string& p : s->unmatched_patterns) j.String(p);
    j.EndArray();
    j.Key("tensor_bytes").Uint(s->universal.tensor_bytes).Key("largest_tensor_bytes").Uint(s->universal.largest_tensor_bytes);
    j.Key("gather_seconds").Double(s->gather_seconds).Key("write_seconds").Double(s->universal.seconds);
    text = "DeepSpeed ZeRO-" + std::to_string(s->zero_stage) + " tp " + std::to_string(s->tp) + " pp " + std::to_string(s->pp) +
           " dp " + std::to_string(s->dp) + ", " + std::to_string(s->params) + " parameters";
    for (const std::string& p : s->unmatched_patterns) std::fprintf(stderr, "memento convert: pattern matched no parameter: %s\n", p.c_str());
  } else if (from == "torch" || from == "safetensors" || from == "memento") {
    Result<ConvertSummary> s = from == "torch" ? ImportTorchFile(fs, args.path, ucp, options)
                               : from == "safetensors" ? ImportSafetensors(fs, args.path, ucp, options)
                                                       : ConvertNativeToUniversal(fs, args.path, ucp, options);
    if (!s.ok()) { progress.Clear(); cleanup(); return Fail(args, s.status()); }
    j.Key("params").Int(s->params).Key("tensor_bytes").Uint(s->tensor_bytes);
    text = std::to_string(s->params) + " parameters, " + HumanBytes(s->tensor_bytes);
  }
  progress.Clear();
  // Step 2: the export.
  if (to == "deepspeed-universal") {
    Result<DeepSpeedExportSummary> x = ExportDeepSpeedUniversal(fs, ucp, out);
    cleanup();
    if (!x.ok()) return Fail(args, x.status());
    j.Key("files").Int(x->files).Key("exported_params").Int(x->params);
    text += "; DeepSpeed universal layout: " + std::to_string(x->files) + " files";
  } else if (to == "safetensors") {
    Result<SafetensorsExportSummary> x = ExportSafetensors(fs, ucp, out, st);
    cleanup();
    if (!x.ok()) return Fail(args, x.status());
    j.Key("files").BeginArray();
    for (const std::string& f : x->files) j.String(f);
    j.EndArray().Key("tensors").Int(x->tensors).Key("bytes").Uint(x->bytes);
    text += "; safetensors: " + std::to_string(x->files.size()) + " files, " + std::to_string(x->tensors) + " tensors, " + HumanBytes(x->bytes);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (args.json) {
    j.Key("seconds").Double(seconds).EndObject();
    std::printf("%s\n", j.str().c_str());
  } else {
    std::printf("converted %s (%s) to %s (%s): %s in %.2f s\n", args.path.c_str(), from.c_str(), out.c_str(), to.c_str(),
                text.c_str(), seconds);
  }
  return kExitOk;
}

std::string DoubleCell(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", v);
  return buf;
}

int Diff(int argc, char** argv) {
  Args args;
  args.command = "diff";
  DiffOptions options;
  std::vector<std::string> positional;
  auto usage = [&](const std::string& message) {
    std::fprintf(stderr, "memento diff: %s\n%s", message.c_str(), kDiffHelp);
    return kExitUsage;
  };
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kDiffHelp, stdout);
      return kExitOk;
    } else if (a == "--json") {
      args.json = true;
    } else if (a == "--atol" || a == "--rtol") {
      if (i + 1 >= argc) return usage(a + " needs a number");
      char* end = nullptr;
      const double v = std::strtod(argv[++i], &end);
      if (end == nullptr || *end != '\0' || !(v >= 0)) return usage(a + " needs a non-negative number");
      (a == "--atol" ? options.atol : options.rtol) = v;
    } else if (a.size() > 1 && a[0] == '-') {
      return usage("unknown option '" + a + "'");
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 2) return usage("expected two checkpoints <A> <B>");
  args.path = positional[0];
  Result<DiffReport> r = DiffCheckpoints(PosixFileSystem(), positional[0], positional[1], options);
  if (!r.ok()) return Fail(args, r.status());
  auto shape = [](const TensorDiff& d) { return ShapeString(d.shape_a.empty() ? d.shape_b : d.shape_a); };
  if (args.json) {
    JsonWriter j;
    j.BeginObject().Key("a").String(positional[0]).Key("b").String(positional[1]).Key("atol").Double(options.atol, 9)
        .Key("rtol").Double(options.rtol, 9).Key("tensors").BeginArray();
    for (const TensorDiff& d : r->tensors) {
      j.BeginObject().Key("name").String(d.name).Key("result").String(d.what).Key("shape").String(shape(d));
      if (d.what == "shape") j.Key("shape_b").String(ShapeString(d.shape_b));
      j.Key("max_abs").Double(d.max_abs, 9).Key("max_rel").Double(d.max_rel, 9).EndObject();
    }
    j.EndArray().Key("differing").Int(r->differing).EndObject();
    std::printf("%s\n", j.str().c_str());
  } else {
    std::vector<std::vector<std::string>> rows = {{"TENSOR", "SHAPE", "MAX_ABS", "MAX_REL", "RESULT"}};
    for (const TensorDiff& d : r->tensors) {
      std::string sh = shape(d);
      if (d.what == "shape") sh += " vs " + ShapeString(d.shape_b);
      rows.push_back({d.name, sh, DoubleCell(d.max_abs), DoubleCell(d.max_rel), d.what});
    }
    std::fputs(Table(rows).c_str(), stdout);
    std::printf("%" PRId64 " of %zu tensors differ\n", r->differing, r->tensors.size());
  }
  return r->differing > 0 ? kExitFailure : kExitOk;
}

int Usage(const std::string& message) {
  std::fprintf(stderr, "memento: %s\n%s", message.c_str(), kUsage);
  return kExitUsage;
}

const char* CommandHelp(const std::string& command) {
  if (command == "ls") return kLsHelp;
  if (command == "inspect") return kInspectHelp;
  if (command == "verify") return kVerifyHelp;
  if (command == "convert") return kConvertHelp;
  if (command == "diff") return kDiffHelp;
  return nullptr;
}

int Main(int argc, char** argv) {
  if (argc < 2) return Usage("no command");
  Args args;
  args.command = argv[1];
  if (args.command == "-h" || args.command == "--help") {
    std::fputs(kUsage, stdout);
    return kExitOk;
  }
  if (args.command == "help") {
    const char* help = argc > 2 ? CommandHelp(argv[2]) : kUsage;
    if (help == nullptr) return Usage(std::string("unknown command '") + argv[2] + "'");
    std::fputs(help, stdout);
    return kExitOk;
  }
  const char* help = CommandHelp(args.command);
  if (help == nullptr) return Usage("unknown command '" + args.command + "'");
  if (args.command == "convert") return Convert(argc, argv);
  if (args.command == "diff") return Diff(argc, argv);
  bool have_path = false;
  bool options_done = false;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (!options_done && (a == "-h" || a == "--help")) {
      std::fputs(help, stdout);
      return kExitOk;
    }
    if (!options_done && a == "--json") {
      args.json = true;
    } else if (!options_done && a == "--") {
      options_done = true;
    } else if (!options_done && a.size() > 1 && a[0] == '-') {
      std::fprintf(stderr, "memento %s: unknown option '%s'\n%s", args.command.c_str(), a.c_str(), help);
      return kExitUsage;
    } else if (have_path) {
      std::fprintf(stderr, "memento %s: one path expected, got '%s' and '%s'\n%s", args.command.c_str(),
                   args.path.c_str(), a.c_str(), help);
      return kExitUsage;
    } else {
      args.path = a;
      have_path = true;
    }
  }
  if (!have_path || args.path.empty()) {
    std::fprintf(stderr, "memento %s: a path is required\n%s", args.command.c_str(), help);
    return kExitUsage;
  }
  if (args.command == "ls") return Ls(args);
  if (args.command == "inspect") return Inspect(args);
  return Verify(args);
}

}  // namespace
}  // namespace memento

int main(int argc, char** argv) { return memento::Main(argc, argv); }
