// memento: the operator's view of persisted checkpoints (docs/formats/native-checkpoint.md):
// `ls` lists them, `inspect` shows one's manifest, tensors and blobs, `verify` re-reads every byte
// and checks every CRC. Text for people, `--json` (one object on stdout) for scripts.
// Exit status: 0 success, 1 failure (missing or damaged input, problems found), 2 usage error.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <iterator>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "converters/json_writer.h"
#include "core/dtype.h"
#include "core/file_system.h"
#include "core/shard.h"
#include "core/status.h"
#include "ucp_format/native_checkpoint.h"

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
    "and exits 1 when there is any; prints \"OK: ...\" and exits 0 when the checkpoint is intact.\n";

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

int Verify(const Args& args) {
  FileSystem* fs = PosixFileSystem();
  Status st = CheckDirectory(fs, args.path);
  if (!st.ok()) return Fail(args, st);
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

int Usage(const std::string& message) {
  std::fprintf(stderr, "memento: %s\n%s", message.c_str(), kUsage);
  return kExitUsage;
}

const char* CommandHelp(const std::string& command) {
  if (command == "ls") return kLsHelp;
  if (command == "inspect") return kInspectHelp;
  if (command == "verify") return kVerifyHelp;
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
