// memento-train-example: a deterministic tensor- and data-parallel MLP trainer that checkpoints every
// parameter, Adam moment, RNG state and data-loader position through the memento client.
//
// It exists to test memento end to end: for a given --seed, world size and --tp, a run killed at any
// step and resumed with `--restore latest` ends with the same `state_hash=` line as a run that was
// never interrupted (and as the reference run, --no-memento).
//
// Layout: world = TP x DP; the ranks of one TP group are adjacent (rank = dp_index * tp + tp_index).
// --zero 1 partitions the Adam moments over DP (the rank's TP-local parameters flattened in order
// into one group, cut into DP equal parts, DeepSpeed ZeRO-1/2 style); --zero 3 partitions values and
// moments of every parameter on its own (ceil(numel / dp) per rank). Each rank updates the part it
// owns and the values are allgathered over DP, so every ZeRO stage gives bitwise the same training.
// `global_state_hash=` hashes the consolidated (layout-free) state: equal across layouts
// whose arithmetic is identical, e.g. after resuming a --zero 1 checkpoint with --zero 3.
// Model: L residual blocks  x += relu(x W1 + b1) W2 + b2  with W1 [H,4H] and b1 [4H] column-parallel,
// W2 [4H,H] row-parallel (partial outputs summed over the TP group) and b2 [H] replicated; then the
// replicated head y = (x * norm.scale) head.w with head.w [H,16]; MSE loss against a synthetic
// target. Adam in fp32. Every reduction (TP activations, DP gradients) is an allgather summed in rank
// order, so results are bitwise reproducible and identical on all replicas.
//
// Loop order, as the client requires (snapshot/client.h): forward; backward; gradient allreduce;
// WaitUntilSafeToUpdate(); optimizer step; Snapshot(step). Registered buffers change only between
// WaitUntilSafeToUpdate() and Snapshot().

// Only the C API of MPI is linked (MPI::MPI_C); keep mpi.h from declaring the C++ bindings.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/env.h"
#include "core/shard.h"
#include "core/status.h"
#include "snapshot/client.h"

namespace {

using memento::Result;
using memento::ShardSpec;
using memento::Status;

constexpr const char* kProgram = "memento-train-example";
constexpr int64_t kOutputs = 16;  // width of the head
constexpr float kLearningRate = 1e-3f;
constexpr float kBeta1 = 0.9f;
constexpr float kBeta2 = 0.999f;
constexpr float kAdamEps = 1e-8f;
// Capacity of the "rng" blob: std::mt19937_64's text form is at most 313 numbers of 20 digits.
constexpr size_t kRngBlobCapacity = 16384;

constexpr const char* kUsage =
    "usage: memento-train-example [flags]   (run under mpirun; connection settings come from\n"
    "       MEMENTO_AGENT_SOCKET, MEMENTO_JOB_ID, MEMENTO_JOB_TOKEN, ... as the client reads them)\n"
    "  --steps N            train through step N (default 10)\n"
    "  --snapshot-every K   Snapshot(step) when step % K == 0 (default 1; 0 = never)\n"
    "  --restore latest|S   restore the newest complete version (or step S) before training,\n"
    "                       then continue from the restored step + 1\n"
    "  --crash-at-step S    raise(SIGKILL) right after Snapshot(S) returns, before the next\n"
    "                       WaitUntilSafeToUpdate()\n"
    "  --crash-rank R       only rank R crashes (default: every rank)\n"
    "  --no-memento         do not connect to an agent (the reference run)\n"
    "  --seed N             model, data and target seed (default 1234)\n"
    "  --tp T               tensor-parallel size; must divide the world size\n"
    "                       (default 2 when the world size is even, else 1; world / D with --dp D)\n"
    "  --dp D               data-parallel size; tp x dp must be the world size (default world / tp)\n"
    "  --zero Z             ZeRO stage 0, 1 (moments partitioned over DP) or 3 (values and moments,\n"
    "                       per parameter); default 0\n"
    "  --hidden H           model width (default 128: ~12.8 MB of state over 4 ranks at tp 2)\n"
    "  --layers L           residual MLP blocks (default 4)\n"
    "  --batch B            samples per data-parallel rank per step (default 16)\n"
    "  --step-ms N          pad every step to at least N ms (stands in for compute; default 0)\n"
    "  --quiet              print only restore results and the final state_hash lines\n"
    "Without --restore, MEMENTO_RESTORE (latest|S|none, set by memento-run) decides; default none.\n"
    "Ends with state_hash= (every rank's buffers: depends on the layout) and global_state_hash= (the\n"
    "consolidated state: equal across layouts whose arithmetic is identical, e.g. another --zero).\n";

// ---- flags ------------------------------------------------------------------------------------

struct Flags {
  int64_t steps = 10;
  int64_t snapshot_every = 1;      // 0 = never
  std::optional<int64_t> restore;  // memento::kLatestStep for "latest"
  int64_t crash_at_step = -1;      // -1 = never
  int64_t crash_rank = -1;         // -1 = every rank
  bool no_memento = false;
  uint64_t seed = 1234;
  int64_t tp = 0;  // 0 = 2 when the world size is even, else 1
  int64_t dp = 0;  // 0 = world / tp
  int64_t zero = 0;
  int64_t hidden = 128;
  int64_t layers = 4;
  int64_t batch = 16;
  int64_t step_ms = 0;
  bool quiet = false;
  bool help = false;
};

template <typename T>
bool ParseNumber(std::string_view text, T* out) {
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, *out);
  return ec == std::errc() && ptr == end;
}

// Accepts "--flag value" and "--flag=value". Returns an error message, or "" when the flags are good.
std::string ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    std::string_view name = arg;
    std::optional<std::string_view> inline_value;
    if (size_t eq = arg.find('='); eq != std::string_view::npos) {
      name = arg.substr(0, eq);
      inline_value = arg.substr(eq + 1);
    }
    if (name == "--no-memento" || name == "--quiet" || name == "--help" || name == "-h") {
      if (inline_value) return std::string(name) + " takes no value";
      if (name == "--no-memento") f->no_memento = true;
      if (name == "--quiet") f->quiet = true;
      if (name == "--help" || name == "-h") f->help = true;
      continue;
    }
    static constexpr std::string_view kValueFlags[] = {
        "--steps", "--snapshot-every", "--restore", "--crash-at-step", "--crash-rank",
        "--seed",  "--tp",             "--hidden",  "--layers",        "--batch",
        "--step-ms", "--dp",           "--zero"};
    if (std::find(std::begin(kValueFlags), std::end(kValueFlags), name) == std::end(kValueFlags)) {
      return "unknown flag '" + std::string(arg) + "'";
    }
    std::string_view value;
    if (inline_value) {
      value = *inline_value;
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return std::string(name) + " needs a value";
    }
    auto number = [&](int64_t* out, int64_t min) -> std::string {
      if (!ParseNumber(value, out) || *out < min) {
        return std::string(name) + ": expected an integer >= " + std::to_string(min) + ", got '" +
               std::string(value) + "'";
      }
      return "";
    };
    std::string err;
    if (name == "--steps") {
      err = number(&f->steps, 0);
    } else if (name == "--snapshot-every") {
      err = number(&f->snapshot_every, 0);
    } else if (name == "--restore") {
      int64_t step = 0;
      if (value == "latest") {
        f->restore = memento::kLatestStep;
      } else if (ParseNumber(value, &step) && step >= 0) {
        f->restore = step;
      } else {
        err = "--restore: expected 'latest' or a step number, got '" + std::string(value) + "'";
      }
    } else if (name == "--crash-at-step") {
      err = number(&f->crash_at_step, 1);
    } else if (name == "--crash-rank") {
      err = number(&f->crash_rank, 0);
    } else if (name == "--seed") {
      if (!ParseNumber(value, &f->seed)) err = "--seed: expected an unsigned integer";
    } else if (name == "--tp") {
      err = number(&f->tp, 1);
    } else if (name == "--dp") {
      err = number(&f->dp, 1);
    } else if (name == "--zero") {
      err = number(&f->zero, 0);
      if (err.empty() && f->zero != 0 && f->zero != 1 && f->zero != 3) err = "--zero: expected 0, 1 or 3";
    } else if (name == "--hidden") {
      err = number(&f->hidden, 1);
    } else if (name == "--layers") {
      err = number(&f->layers, 0);
    } else if (name == "--step-ms") {
      err = number(&f->step_ms, 0);
    } else if (name == "--batch") {
      err = number(&f->batch, 1);
    }
    if (!err.empty()) return err;
  }
  if (f->restore && f->no_memento) return "--restore needs memento; it cannot go with --no-memento";
  if (!f->restore && !f->no_memento) {
    // memento-run passes the step to restore in the environment.
    const std::string& env = memento::Env().restore;
    int64_t step = 0;
    if (env == "latest") {
      f->restore = memento::kLatestStep;
    } else if (ParseNumber(std::string_view(env), &step) && step >= 0) {
      f->restore = step;
    } else if (!env.empty() && env != "none") {
      return "MEMENTO_RESTORE: expected latest, none or a step number, got '" + env + "'";
    }
  }
  return "";
}

// ---- parallel layout and deterministic reductions ----------------------------------------------

struct Layout {
  int rank = 0;
  int world = 1;
  int tp = 1;
  int dp = 1;
  int tp_index = 0;  // index inside the TP group
  int dp_index = 0;  // which data-parallel replica
  MPI_Comm tp_comm = MPI_COMM_NULL;
  MPI_Comm dp_comm = MPI_COMM_NULL;
};

// Sums `n` floats over `comm` in rank order (((x0 + x1) + x2) ...), the same bits on every member.
// MPI errors abort the job (MPI_ERRORS_ARE_FATAL, the default handler).
void AllreduceSumOrdered(MPI_Comm comm, int comm_size, float* data, size_t n,
                         std::vector<float>* scratch) {
  if (comm_size == 1 || n == 0) return;
  scratch->resize(n * static_cast<size_t>(comm_size));
  MPI_Allgather(data, static_cast<int>(n), MPI_FLOAT, scratch->data(), static_cast<int>(n),
                MPI_FLOAT, comm);
  std::memcpy(data, scratch->data(), n * sizeof(float));
  for (int r = 1; r < comm_size; ++r) {
    const float* part = scratch->data() + static_cast<size_t>(r) * n;
    for (size_t i = 0; i < n; ++i) data[i] += part[i];
  }
}

[[noreturn]] void Die(const Layout& layout, const std::string& what, const Status& status) {
  std::fprintf(stderr, "%s: rank %d: %s: %s\n", kProgram, layout.rank, what.c_str(),
               status.ToString().c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::_Exit(1);  // MPI_Abort does not return; this keeps the compiler sure of it
}

void Check(const Layout& layout, const std::string& what, const Status& status) {
  if (!status.ok()) Die(layout, what, status);
}

// ---- hashing and counter-based random numbers --------------------------------------------------

class Fnv1a64 {
 public:
  void Add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) {
      h_ ^= p[i];
      h_ *= 0x100000001b3ull;
    }
  }
  template <typename T>
  void AddValue(const T& v) {
    Add(&v, sizeof(v));
  }
  void AddString(std::string_view s) {
    AddValue(static_cast<uint64_t>(s.size()));
    Add(s.data(), s.size());
  }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 0xcbf29ce484222325ull;
};

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1) from 64 random bits.
float UniformPm1(uint64_t bits) {
  return static_cast<float>(static_cast<double>(bits >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

// ---- the model --------------------------------------------------------------------------------

// One registered parameter; its value, gradient and Adam moments sit at `offset` in the flat buffers.
struct Param {
  std::string name;
  ShardSpec spec;
  size_t offset = 0;  // elements
  size_t numel = 0;   // spec.local_numel
  // Initial value of global element i: init_const + init_uniform * U[-1,1)(seed, name, i), so the
  // initial global tensor does not depend on the layout.
  float init_const = 0;
  float init_uniform = 0;
};

struct Model {
  int64_t hidden = 0;     // H
  int64_t ffn_local = 0;  // this rank's columns of W1 (rows of W2)
  int64_t layers = 0;
  std::vector<Param> params;
  struct Block {
    size_t w1, b1, w2, b2;  // indices into params
  };
  std::vector<Block> blocks;
  size_t scale = 0;
  size_t head = 0;
  // Flat buffers over all params. Registered with the client (except grad), so never resized
  // after registration. grad has one extra trailing element that carries the loss through the
  // data-parallel reduction.
  std::vector<float> value, grad, exp_avg, exp_avg_sq;
  // ZeRO (set by PartitionModel): per parameter and state (value, exp_avg, exp_avg_sq), the part of
  // the parameter's local buffer this rank registers, [begin, begin + len), and its spec.
  struct Part {
    size_t begin = 0;
    size_t len = 0;
    ShardSpec spec;
  };
  std::vector<std::array<Part, 3>> parts;
  int zero = 0;

  float* V(size_t p) { return value.data() + params[p].offset; }
  float* G(size_t p) { return grad.data() + params[p].offset; }
  size_t total() const { return value.size(); }
};

Result<Model> BuildModel(const Flags& flags, const Layout& layout) {
  Model m;
  const int64_t h = flags.hidden;
  const int64_t f = 4 * h;
  m.hidden = h;
  m.layers = flags.layers;
  size_t total = 0;
  auto add = [&](std::string name, ShardSpec spec, float init_const, float init_uniform) {
    Param p;
    p.name = std::move(name);
    p.spec = std::move(spec);
    p.offset = total;
    p.numel = static_cast<size_t>(p.spec.local_numel);
    p.init_const = init_const;
    p.init_uniform = init_uniform;
    total += p.numel;
    m.params.push_back(std::move(p));
    return m.params.size() - 1;
  };
  const float w1_scale = 1.0f / std::sqrt(static_cast<float>(h));
  const float w2_scale = 1.0f / std::sqrt(static_cast<float>(f));
  for (int64_t l = 0; l < flags.layers; ++l) {
    const std::string prefix = "layers." + std::to_string(l) + ".";
    MEMENTO_ASSIGN_OR_RETURN(ShardSpec w1, memento::SplitEvenly({h, f}, 1, layout.tp, layout.tp_index,
                                                                layout.dp_index));
    MEMENTO_ASSIGN_OR_RETURN(ShardSpec b1, memento::SplitEvenly({f}, 0, layout.tp, layout.tp_index,
                                                                layout.dp_index));
    MEMENTO_ASSIGN_OR_RETURN(ShardSpec w2, memento::SplitEvenly({f, h}, 0, layout.tp, layout.tp_index,
                                                                layout.dp_index));
    if (w1.fragments.size() != 1 || w1.fragments[0].box.lengths.size() != 2) {
      return memento::Internal("SplitEvenly gave " + w1.DebugString() + " for " + prefix + "w1");
    }
    const int64_t cols = w1.fragments[0].box.lengths[1];
    if (w1.local_numel != h * cols || b1.local_numel != cols || w2.local_numel != cols * h) {
      return memento::Internal("inconsistent TP shards for " + prefix + "*: w1 " + w1.DebugString() +
                               ", b1 " + b1.DebugString() + ", w2 " + w2.DebugString());
    }
    m.ffn_local = cols;
    Model::Block b;
    b.w1 = add(prefix + "w1", std::move(w1), 0, w1_scale);
    b.b1 = add(prefix + "b1", std::move(b1), 0, 0);
    b.w2 = add(prefix + "w2", std::move(w2), 0, w2_scale);
    b.b2 = add(prefix + "b2", memento::WholeTensor({h}, layout.rank), 0, 0);
    m.blocks.push_back(b);
  }
  if (flags.layers == 0) m.ffn_local = 0;
  m.scale = add("norm.scale", memento::WholeTensor({h}, layout.rank), 1, 0);
  m.head = add("head.w", memento::WholeTensor({h, kOutputs}, layout.rank), 0, w1_scale);
  for (const Param& p : m.params) {
    if (Status st = p.spec.Validate(); !st.ok()) return st.WithContext("shard spec of " + p.name);
  }
  m.value.assign(total, 0.0f);
  m.grad.assign(total + 1, 0.0f);
  m.exp_avg.assign(total, 0.0f);
  m.exp_avg_sq.assign(total, 0.0f);
  return m;
}

// Elements [begin, begin + len) of the local buffer of `tp_spec` (box fragments at consecutive local
// offsets) as box fragments of the global tensor at local offsets from 0: a ZeRO partition of a TP
// shard, whose copies on other TP ranks (when the parameter is TP-replicated) carry `replica_id`.
ShardSpec LocalRange(const ShardSpec& tp_spec, int64_t begin, int64_t len, int32_t replica_id) {
  ShardSpec out;
  out.global_shape = tp_spec.global_shape;
  out.original_shape = tp_spec.original_shape;
  int64_t local = 0;
  for (const memento::Fragment& f : tp_spec.fragments) {
    const int64_t lo = std::max(begin, f.local_offset);
    const int64_t hi = std::min(begin + len, f.local_offset + f.numel());
    if (hi <= lo) continue;
    for (memento::Box b : memento::FlatRangeToBoxes(f.box.lengths, lo - f.local_offset, hi - lo)) {
      for (size_t d = 0; d < b.offsets.size(); ++d) b.offsets[d] += f.box.offsets[d];
      memento::Fragment g;
      g.box = b;
      g.local_offset = local;
      g.replica_id = replica_id;
      local += b.numel();
      out.fragments.push_back(std::move(g));
    }
  }
  out.local_numel = len;
  return out;
}

// The ranges [begin, end) of the flat buffers that data-parallel index `dp_index` owns (updates
// and, for ZeRO, registers): everything for zero 0; one DP-th of the flat group for zero 1; one
// DP-th of every parameter for zero 3.
std::vector<std::pair<size_t, size_t>> OwnedRanges(const Model& m, int zero, int dp, int dp_index) {
  const size_t total = m.total();
  const auto k = static_cast<size_t>(dp_index);
  const auto parts = static_cast<size_t>(dp);
  if (zero == 0) return {{0, total}};
  if (zero == 1) {
    const size_t part = (total + parts - 1) / parts;
    return {{std::min(total, k * part), std::min(total, (k + 1) * part)}};
  }
  std::vector<std::pair<size_t, size_t>> out;
  for (const Param& p : m.params) {
    const size_t c = (p.numel + parts - 1) / parts;
    out.push_back({p.offset + std::min(p.numel, k * c), p.offset + std::min(p.numel, (k + 1) * c)});
  }
  return out;
}

// Fills m.parts for --zero.
void PartitionModel(Model& m, const Layout& layout, int zero) {
  m.zero = zero;
  m.parts.assign(m.params.size(), {});
  const std::vector<std::pair<size_t, size_t>> owned = OwnedRanges(m, zero, layout.dp, layout.dp_index);
  for (size_t i = 0; i < m.params.size(); ++i) {
    const Param& p = m.params[i];
    // A parameter every TP rank holds whole: its partitions' copies are replicas across TP.
    const bool whole = p.spec.fragments.size() == 1 && p.spec.fragments[0].box.lengths == p.spec.global_shape;
    size_t begin = 0, len = 0;
    for (const auto& [b, e] : owned) {
      const size_t lo = std::max(b, p.offset), hi = std::min(e, p.offset + p.numel);
      if (lo < hi) {
        begin = lo - p.offset;
        len = hi - lo;
      }
    }
    for (int s = 0; s < 3; ++s) {
      Model::Part& part = m.parts[i][static_cast<size_t>(s)];
      if (zero == 0 || (zero == 1 && s == 0)) {
        part = {0, p.numel, p.spec};
      } else {
        part = {begin, len,
                LocalRange(p.spec, static_cast<int64_t>(begin), static_cast<int64_t>(len), whole ? layout.tp_index : 0)};
      }
    }
  }
}

// Rebuilds the whole of m.value on every DP rank from the parts each owns (ZeRO), in DP order.
void GatherValues(Model& m, const Layout& layout, std::vector<float>* scratch) {
  if (m.zero == 0 || layout.dp == 1) return;
  std::vector<int> counts(static_cast<size_t>(layout.dp)), displs(static_cast<size_t>(layout.dp));
  std::vector<std::vector<std::pair<size_t, size_t>>> owned;
  int at = 0;
  for (int k = 0; k < layout.dp; ++k) {
    owned.push_back(OwnedRanges(m, m.zero, layout.dp, k));
    size_t n = 0;
    for (const auto& [b, e] : owned.back()) n += e - b;
    counts[static_cast<size_t>(k)] = static_cast<int>(n);
    displs[static_cast<size_t>(k)] = at;
    at += static_cast<int>(n);
  }
  std::vector<float> mine;
  for (const auto& [b, e] : owned[static_cast<size_t>(layout.dp_index)]) {
    mine.insert(mine.end(), m.value.begin() + static_cast<std::ptrdiff_t>(b), m.value.begin() + static_cast<std::ptrdiff_t>(e));
  }
  scratch->resize(static_cast<size_t>(at));
  MPI_Allgatherv(mine.data(), static_cast<int>(mine.size()), MPI_FLOAT, scratch->data(), counts.data(),
                 displs.data(), MPI_FLOAT, layout.dp_comm);
  size_t from = 0;
  for (int k = 0; k < layout.dp; ++k) {
    for (const auto& [b, e] : owned[static_cast<size_t>(k)]) {
      std::memcpy(m.value.data() + b, scratch->data() + from, (e - b) * sizeof(float));
      from += e - b;
    }
  }
}

// Sets every parameter to its initial value and the Adam moments to zero.
Status InitModel(Model& m, uint64_t seed) {
  for (size_t i = 0; i < m.params.size(); ++i) {
    const Param& p = m.params[i];
    float* out = m.V(i);
    Fnv1a64 name_hash;
    name_hash.AddString(p.name);
    const uint64_t stream = SplitMix64(seed ^ name_hash.value());
    const std::vector<int64_t>& shape = p.spec.global_shape;
    for (const memento::Fragment& fr : p.spec.fragments) {
      if (fr.kind != memento::Fragment::Kind::kBox) {
        return memento::Internal("unexpected flat fragment in " + p.name);
      }
      std::vector<int64_t> idx(shape.size(), 0);
      const int64_t n = fr.numel();
      for (int64_t e = 0; e < n; ++e) {
        int64_t flat = 0;
        for (size_t d = 0; d < shape.size(); ++d) flat = flat * shape[d] + fr.box.offsets[d] + idx[d];
        out[fr.local_offset + e] =
            p.init_const + p.init_uniform * UniformPm1(SplitMix64(stream + static_cast<uint64_t>(flat)));
        for (size_t d = shape.size(); d-- > 0;) {
          if (++idx[d] < fr.box.lengths[d]) break;
          idx[d] = 0;
        }
      }
    }
  }
  std::fill(m.exp_avg.begin(), m.exp_avg.end(), 0.0f);
  std::fill(m.exp_avg_sq.begin(), m.exp_avg_sq.end(), 0.0f);
  return Status::Ok();
}

// ---- dense kernels (row-major, plain loops) ------------------------------------------------------
//
// The inner loops run over fixed blocks of kLanes elements plus a scalar tail, and the pointers are
// __restrict, so that GCC vectorizes them at -O2 (its "very cheap" cost model refuses loops with a
// runtime trip count or an aliasing check). Vectorizing these element-wise loops does not reorder
// any sum, so results stay bitwise the same at any optimization level.

constexpr int64_t kLanes = 16;

// y[j] += alpha * x[j] for j < n
inline void Axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) y[j + u] += alpha * x[j + u];
  }
  for (; j < n; ++j) y[j] += alpha * x[j];
}

// c[m,n] += a[m,k] * b[k,n]
void MatMulAcc(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) Axpy(a[i * k + p], b + p * n, c + i * n, n);
  }
}

// c[k,n] += a[m,k]^T * b[m,n]
void MatMulTransAAcc(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) Axpy(a[i * k + p], b + i * n, c + p * n, n);
  }
}

// t[n,k] = b[k,n]^T, in tiles so that both sides stay in cache.
void Transpose(const float* b, float* t, int64_t k, int64_t n) {
  constexpr int64_t kTile = 32;
  for (int64_t p0 = 0; p0 < k; p0 += kTile) {
    for (int64_t j0 = 0; j0 < n; j0 += kTile) {
      const int64_t p1 = std::min(k, p0 + kTile);
      const int64_t j1 = std::min(n, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t p = p0; p < p1; ++p) t[j * k + p] = b[p * n + j];
      }
    }
  }
}

// c[m,k] = a[m,n] * b[k,n]^T, through `bt`, scratch of k * n elements.
void MatMulTransB(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n,
                  std::vector<float>* bt) {
  bt->resize(static_cast<size_t>(k * n));
  Transpose(b, bt->data(), k, n);
  std::fill(c, c + m * k, 0.0f);
  MatMulAcc(a, bt->data(), c, m, n, k);
}

// Activations kept from forward for backward, and scratch; sized once.
struct Workspace {
  std::vector<float> x0, target;
  std::vector<std::vector<float>> act;  // act[l]: input of block l [B,H]; act[L]: output of the last
  std::vector<std::vector<float>> pre;  // pre[l]: x W1 + b1 [B,F]
  std::vector<std::vector<float>> hid;  // hid[l]: relu(pre[l]) [B,F]
  std::vector<float> normed, y, dy, dnormed, dx, dhid, dx_partial, transposed, scratch;
};

Workspace MakeWorkspace(const Model& m, int64_t batch) {
  const auto bh = static_cast<size_t>(batch * m.hidden);
  const auto bf = static_cast<size_t>(batch * m.ffn_local);
  Workspace w;
  w.x0.resize(bh);
  w.target.resize(static_cast<size_t>(batch * kOutputs));
  w.act.assign(static_cast<size_t>(m.layers + 1), std::vector<float>(bh));
  w.pre.assign(static_cast<size_t>(m.layers), std::vector<float>(bf));
  w.hid.assign(static_cast<size_t>(m.layers), std::vector<float>(bf));
  w.normed.resize(bh);
  w.y.resize(static_cast<size_t>(batch * kOutputs));
  w.dy.resize(w.y.size());
  w.dnormed.resize(bh);
  w.dx.resize(bh);
  w.dhid.resize(bf);
  w.dx_partial.resize(bh);
  return w;
}

// Forward and backward of this rank's batch (w.x0, w.target). Overwrites m.grad with this rank's
// gradients (not yet averaged over DP) and returns the rank's mean loss.
float ForwardBackward(Model& m, const Layout& layout, int64_t batch, Workspace& w) {
  const int64_t bsz = batch;
  const int64_t h = m.hidden;
  const int64_t f = m.ffn_local;
  const int64_t L = m.layers;
  std::fill(m.grad.begin(), m.grad.end(), 0.0f);

  // Forward.
  w.act[0] = w.x0;
  for (int64_t l = 0; l < L; ++l) {
    const Model::Block& blk = m.blocks[static_cast<size_t>(l)];
    const float* a = w.act[static_cast<size_t>(l)].data();
    float* pre = w.pre[static_cast<size_t>(l)].data();
    float* hid = w.hid[static_cast<size_t>(l)].data();
    const float* b1 = m.V(blk.b1);
    for (int64_t i = 0; i < bsz; ++i) std::memcpy(pre + i * f, b1, static_cast<size_t>(f) * sizeof(float));
    MatMulAcc(a, m.V(blk.w1), pre, bsz, h, f);
    for (int64_t i = 0; i < bsz * f; ++i) hid[i] = pre[i] > 0.0f ? pre[i] : 0.0f;
    float* partial = w.dx_partial.data();
    std::fill(partial, partial + bsz * h, 0.0f);
    MatMulAcc(hid, m.V(blk.w2), partial, bsz, f, h);
    AllreduceSumOrdered(layout.tp_comm, layout.tp, partial, static_cast<size_t>(bsz * h), &w.scratch);
    float* out = w.act[static_cast<size_t>(l + 1)].data();
    const float* b2 = m.V(blk.b2);
    for (int64_t i = 0; i < bsz; ++i) {
      for (int64_t j = 0; j < h; ++j) out[i * h + j] = (a[i * h + j] + partial[i * h + j]) + b2[j];
    }
  }
  const float* xl = w.act[static_cast<size_t>(L)].data();
  const float* scale = m.V(m.scale);
  const float* head = m.V(m.head);
  for (int64_t i = 0; i < bsz; ++i) {
    for (int64_t j = 0; j < h; ++j) w.normed[static_cast<size_t>(i * h + j)] = xl[i * h + j] * scale[j];
  }
  std::fill(w.y.begin(), w.y.end(), 0.0f);
  MatMulAcc(w.normed.data(), head, w.y.data(), bsz, h, kOutputs);
  float loss = 0.0f;
  const float inv_count = 1.0f / static_cast<float>(bsz * kOutputs);
  for (size_t i = 0; i < w.y.size(); ++i) {
    const float d = w.y[i] - w.target[i];
    loss += d * d;
    w.dy[i] = 2.0f * d * inv_count;
  }
  loss *= inv_count;

  // Backward of the head.
  MatMulTransAAcc(w.normed.data(), w.dy.data(), m.G(m.head), bsz, h, kOutputs);
  MatMulTransB(w.dy.data(), head, w.dnormed.data(), bsz, h, kOutputs, &w.transposed);
  float* dscale = m.G(m.scale);
  for (int64_t i = 0; i < bsz; ++i) {
    for (int64_t j = 0; j < h; ++j) {
      const float dn = w.dnormed[static_cast<size_t>(i * h + j)];
      dscale[j] += dn * xl[i * h + j];
      w.dx[static_cast<size_t>(i * h + j)] = dn * scale[j];
    }
  }

  // Backward of the blocks; w.dx is the gradient of act[l + 1].
  for (int64_t l = L - 1; l >= 0; --l) {
    const Model::Block& blk = m.blocks[static_cast<size_t>(l)];
    const float* a = w.act[static_cast<size_t>(l)].data();
    const float* pre = w.pre[static_cast<size_t>(l)].data();
    const float* hid = w.hid[static_cast<size_t>(l)].data();
    float* dx = w.dx.data();
    float* db2 = m.G(blk.b2);
    for (int64_t i = 0; i < bsz; ++i) {
      for (int64_t j = 0; j < h; ++j) db2[j] += dx[i * h + j];
    }
    MatMulTransAAcc(hid, dx, m.G(blk.w2), bsz, f, h);
    // dhid = dx W2^T, masked by relu'.
    float* dhid = w.dhid.data();
    MatMulTransB(dx, m.V(blk.w2), dhid, bsz, f, h, &w.transposed);
    for (int64_t i = 0; i < bsz * f; ++i) {
      if (!(pre[i] > 0.0f)) dhid[i] = 0.0f;
    }
    float* db1 = m.G(blk.b1);
    for (int64_t i = 0; i < bsz; ++i) {
      for (int64_t j = 0; j < f; ++j) db1[j] += dhid[i * f + j];
    }
    MatMulTransAAcc(a, dhid, m.G(blk.w1), bsz, h, f);
    if (l == 0) break;  // the input needs no gradient
    // dx += (dhid W1^T) summed over the TP group; the residual path adds dx once, not per TP rank.
    float* partial = w.dx_partial.data();
    MatMulTransB(dhid, m.V(blk.w1), partial, bsz, h, f, &w.transposed);
    AllreduceSumOrdered(layout.tp_comm, layout.tp, partial, static_cast<size_t>(bsz * h), &w.scratch);
    for (int64_t i = 0; i < bsz * h; ++i) dx[i] += partial[i];
  }
  return loss;
}

// Averages the gradients (and the trailing loss element) over the DP group.
void AverageGradients(Model& m, const Layout& layout, std::vector<float>* scratch) {
  if (layout.dp == 1) return;
  AllreduceSumOrdered(layout.dp_comm, layout.dp, m.grad.data(), m.grad.size(), scratch);
  const float inv_dp = 1.0f / static_cast<float>(layout.dp);
  for (float& g : m.grad) g *= inv_dp;
}

// Adam (no weight decay) with bias correction, `step` counted from 1.
void AdamStep(Model& m, int64_t step, const std::vector<std::pair<size_t, size_t>>& owned) {
  const double bc1 = 1.0 - std::pow(static_cast<double>(kBeta1), static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(kBeta2), static_cast<double>(step));
  const auto step_size = static_cast<float>(kLearningRate / bc1);
  const auto inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  float* p = m.value.data();
  float* mo = m.exp_avg.data();
  float* v = m.exp_avg_sq.data();
  const float* g = m.grad.data();
  for (const auto& [begin, end] : owned) {
    for (size_t i = begin; i < end; ++i) {
      mo[i] = kBeta1 * mo[i] + (1.0f - kBeta1) * g[i];
      v[i] = kBeta2 * v[i] + (1.0f - kBeta2) * g[i] * g[i];
      p[i] -= step_size * mo[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + kAdamEps);
    }
  }
}

// ---- data and the non-tensor state --------------------------------------------------------------

// The data loader: inputs come from a per-DP-replica std::mt19937_64 (the "rng" blob); targets are a
// fixed function of the input plus noise keyed by the global sample index ("dataloader" blob).
struct DataLoader {
  std::mt19937_64 rng;
  int64_t next_sample = 0;  // global index of the first sample of the next global batch
};

DataLoader MakeDataLoader(uint64_t seed, const Layout& layout) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(layout.dp_index)};
  return DataLoader{std::mt19937_64(seq), 0};
}

// Fills w.x0 [B,H] and w.target [B,16] with this DP replica's share of the next global batch.
void NextBatch(DataLoader& d, const Layout& layout, int64_t batch, int64_t hidden, uint64_t seed,
               Workspace& w) {
  for (float& x : w.x0) x = UniformPm1(d.rng());
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t sample = d.next_sample + layout.dp_index * batch + i;
    const float* x = w.x0.data() + i * hidden;
    for (int64_t o = 0; o < kOutputs; ++o) {
      const float signal = 0.5f * std::tanh(2.0f * x[o % hidden] - x[(o + kOutputs) % hidden]);
      const uint64_t key = SplitMix64(seed ^ SplitMix64(static_cast<uint64_t>(sample * kOutputs + o)));
      w.target[static_cast<size_t>(i * kOutputs + o)] = signal + 0.05f * UniformPm1(key);
    }
  }
  d.next_sample += batch * layout.dp;
}

std::string RngText(const std::mt19937_64& rng) {
  std::ostringstream os;
  os << rng;
  return os.str();
}

// The registered blobs. Written only between WaitUntilSafeToUpdate() and Snapshot().
struct Blobs {
  std::vector<char> rng = std::vector<char>(kRngBlobCapacity);
  size_t rng_size = 0;
  int64_t dataloader = 0;  // DataLoader::next_sample
  size_t dataloader_size = sizeof(int64_t);
  int64_t adam_step = 0;  // steps applied so far
  size_t adam_step_size = sizeof(int64_t);
};

Status SaveBlobs(const DataLoader& d, int64_t adam_step, Blobs* b) {
  const std::string text = RngText(d.rng);
  if (text.size() > b->rng.size()) {
    return memento::Internal("rng state of " + std::to_string(text.size()) + " bytes exceeds the blob");
  }
  std::memcpy(b->rng.data(), text.data(), text.size());
  b->rng_size = text.size();
  b->dataloader = d.next_sample;
  b->dataloader_size = sizeof(int64_t);
  b->adam_step = adam_step;
  b->adam_step_size = sizeof(int64_t);
  return Status::Ok();
}

// Rebuilds the data loader from restored blobs and checks them against the restored version.
Status LoadBlobs(const Blobs& b, int64_t restored_step, int64_t global_batch, DataLoader* d) {
  if (b.dataloader_size != sizeof(int64_t) || b.adam_step_size != sizeof(int64_t)) {
    return memento::DataLoss("restored blobs 'dataloader' (" + std::to_string(b.dataloader_size) +
                             " bytes) and 'adam_step' (" + std::to_string(b.adam_step_size) +
                             " bytes) should be 8 bytes each");
  }
  if (b.adam_step != restored_step) {
    return memento::DataLoss("restored adam_step " + std::to_string(b.adam_step) +
                             " differs from the restored version's step " + std::to_string(restored_step));
  }
  if (b.dataloader != restored_step * global_batch) {
    return memento::InvalidArgument(
        "restored dataloader position " + std::to_string(b.dataloader) + " is not step " +
        std::to_string(restored_step) + " x global batch " + std::to_string(global_batch) +
        " (was the snapshot taken with another --batch or world size?)");
  }
  std::istringstream is(std::string(b.rng.data(), b.rng_size));
  is >> d->rng;
  if (is.fail()) {
    return memento::DataLoss("restored 'rng' blob (" + std::to_string(b.rng_size) +
                             " bytes) is not a std::mt19937_64 state");
  }
  d->next_sample = b.dataloader;
  return Status::Ok();
}

// FNV-1a of this rank's state: every tensor's name, values and Adam moments in registration order,
// then the data RNG's state.
uint64_t RankStateHash(const Model& m, const DataLoader& d) {
  Fnv1a64 h;
  for (const Param& p : m.params) {
    h.AddString(p.name);
    h.Add(m.value.data() + p.offset, p.numel * sizeof(float));
    h.Add(m.exp_avg.data() + p.offset, p.numel * sizeof(float));
    h.Add(m.exp_avg_sq.data() + p.offset, p.numel * sizeof(float));
  }
  h.AddString(RngText(d.rng));
  return h.value();
}

// FNV-1a of the consolidated state, the same for any --tp, --dp and --zero that hold the same
// values: every parameter's global value and Adam moments (each element from the rank whose part
// has replica id 0), then the data RNG of every DP replica in DP order, the step and the data
// position. Collective; the result is meaningful on rank 0.
uint64_t GlobalStateHash(const Model& m, const Layout& layout, const DataLoader& d, int64_t done) {
  Fnv1a64 h;
  const bool root = layout.rank == 0;
  std::vector<uint32_t> mine, all;
  for (size_t i = 0; i < m.params.size(); ++i) {
    const Param& p = m.params[i];
    const std::vector<int64_t>& shape = p.spec.global_shape;
    const float* buffers[3] = {m.value.data(), m.exp_avg.data(), m.exp_avg_sq.data()};
    for (size_t s = 0; s < 3; ++s) {
      const Model::Part& part = m.parts[i][s];
      mine.assign(static_cast<size_t>(memento::NumElements(shape)), 0);
      const float* base = buffers[s] + p.offset + part.begin;
      for (const memento::Fragment& f : part.spec.fragments) {
        if (f.replica_id != 0) continue;
        std::vector<int64_t> idx(shape.size(), 0);
        for (int64_t e = 0; e < f.numel(); ++e) {
          int64_t flat = 0;
          for (size_t k = 0; k < shape.size(); ++k) flat = flat * shape[k] + f.box.offsets[k] + idx[k];
          std::memcpy(&mine[static_cast<size_t>(flat)], base + f.local_offset + e, sizeof(uint32_t));
          for (size_t k = shape.size(); k-- > 0;) {
            if (++idx[k] < f.box.lengths[k]) break;
            idx[k] = 0;
          }
        }
      }
      // Every element has exactly one owner; the others contribute zero bits.
      all.resize(root ? mine.size() : 0);
      MPI_Reduce(mine.data(), all.data(), static_cast<int>(mine.size()), MPI_UINT32_T, MPI_BOR, 0, MPI_COMM_WORLD);
      if (root) {
        h.AddString(p.name + (s == 0 ? "" : s == 1 ? ".exp_avg" : ".exp_avg_sq"));
        h.Add(all.data(), all.size() * sizeof(uint32_t));
      }
    }
  }
  Fnv1a64 rng;
  rng.AddString(RngText(d.rng));
  const uint64_t rng_hash = rng.value();
  std::vector<uint64_t> rngs(root ? static_cast<size_t>(layout.world) : 0);
  MPI_Gather(&rng_hash, 1, MPI_UINT64_T, rngs.data(), 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  for (int r = 0; r < layout.world && root; r += layout.tp) h.AddValue(rngs[static_cast<size_t>(r)]);
  h.AddValue(done);
  h.AddValue(d.next_sample);
  return h.value();
}

// ---- memento ------------------------------------------------------------------------------------

std::unique_ptr<memento::Client> ConnectAndRegister(const Layout& layout, Model& m, Blobs& blobs) {
  memento::ClientOptions options;
  options.rank = layout.rank;
  options.world_size = layout.world;
  // local_rank stays -1 (the launcher's environment) unless no launcher says it, e.g. a singleton.
  if (std::getenv("OMPI_COMM_WORLD_LOCAL_RANK") == nullptr && std::getenv("SLURM_LOCALID") == nullptr) {
    MPI_Comm node_comm;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, layout.rank, MPI_INFO_NULL, &node_comm);
    MPI_Comm_rank(node_comm, &options.local_rank);
    MPI_Comm_free(&node_comm);
  }
  Result<std::unique_ptr<memento::Client>> connected = memento::Client::Connect(options);
  if (!connected.ok()) Die(layout, "Client::Connect", connected.status());
  std::unique_ptr<memento::Client> client = std::move(connected).value();

  for (size_t i = 0; i < m.params.size(); ++i) {
    const Param& p = m.params[i];
    const std::pair<const char*, float*> views[] = {
        {"", m.value.data() + p.offset},
        {".exp_avg", m.exp_avg.data() + p.offset},
        {".exp_avg_sq", m.exp_avg_sq.data() + p.offset},
    };
    for (size_t s = 0; s < 3; ++s) {
      const Model::Part& part = m.parts[i][s];
      if (part.len == 0) continue;  // this rank's ZeRO partition holds none of it
      const std::string name = p.name + views[s].first;
      Check(layout, "RegisterTensor '" + name + "' " + part.spec.DebugString(),
            client->RegisterTensor(name, views[s].second + part.begin, part.len * sizeof(float),
                                   memento::DType::kF32, part.spec));
    }
  }
  Check(layout, "RegisterBlob 'rng'",
        client->RegisterBlob("rng", blobs.rng.data(), blobs.rng.size(), &blobs.rng_size));
  Check(layout, "RegisterBlob 'dataloader'",
        client->RegisterBlob("dataloader", &blobs.dataloader, sizeof(int64_t), &blobs.dataloader_size));
  Check(layout, "RegisterBlob 'adam_step'",
        client->RegisterBlob("adam_step", &blobs.adam_step, sizeof(int64_t), &blobs.adam_step_size));
  Check(layout, "FinishRegistration", client->FinishRegistration());
  return client;
}

int Run(int argc, char** argv) {
  Layout layout;
  MPI_Comm_rank(MPI_COMM_WORLD, &layout.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &layout.world);
  const bool root = layout.rank == 0;

  Flags flags;
  if (std::string err = ParseFlags(argc, argv, &flags); !err.empty() || flags.help) {
    if (root) {
      if (!err.empty()) std::fprintf(stderr, "%s: %s\n", kProgram, err.c_str());
      std::fputs(kUsage, err.empty() ? stdout : stderr);
    }
    return err.empty() ? 0 : 2;
  }
  if (flags.tp == 0 && flags.dp > 0 && layout.world % flags.dp == 0) flags.tp = layout.world / flags.dp;
  if (flags.tp == 0) flags.tp = layout.world % 2 == 0 ? 2 : 1;
  if (flags.dp > 0 && flags.dp * flags.tp != layout.world) {
    if (root) {
      std::fprintf(stderr, "%s: --tp %lld x --dp %lld must be the world size %d\n", kProgram,
                   static_cast<long long>(flags.tp), static_cast<long long>(flags.dp), layout.world);
    }
    return 2;
  }
  if (layout.world % flags.tp != 0 || 4 * flags.hidden < flags.tp) {
    if (root) {
      std::fprintf(stderr, "%s: --tp %lld must divide the world size %d and be at most 4 x --hidden\n",
                   kProgram, static_cast<long long>(flags.tp), layout.world);
    }
    return 2;
  }
  layout.tp = static_cast<int>(flags.tp);
  layout.dp = layout.world / layout.tp;
  layout.tp_index = layout.rank % layout.tp;
  layout.dp_index = layout.rank / layout.tp;
  MPI_Comm_split(MPI_COMM_WORLD, layout.dp_index, layout.tp_index, &layout.tp_comm);
  MPI_Comm_split(MPI_COMM_WORLD, layout.tp_index, layout.dp_index, &layout.dp_comm);

  Result<Model> built = BuildModel(flags, layout);
  if (!built.ok()) Die(layout, "building the model", built.status());
  Model model = std::move(built).value();
  PartitionModel(model, layout, static_cast<int>(flags.zero));
  const std::vector<std::pair<size_t, size_t>> owned =
      OwnedRanges(model, model.zero, layout.dp, layout.dp_index);
  Check(layout, "initializing the model", InitModel(model, flags.seed));
  DataLoader data = MakeDataLoader(flags.seed, layout);
  Blobs blobs;
  Check(layout, "saving the blobs", SaveBlobs(data, 0, &blobs));
  const int64_t global_batch = flags.batch * layout.dp;

  if (!flags.quiet) {
    const auto rank_bytes = static_cast<long long>(3 * model.total() * sizeof(float));
    long long all_bytes = 0;
    MPI_Reduce(&rank_bytes, &all_bytes, 1, MPI_LONG_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    if (root) {
      std::printf("world=%d tp=%d dp=%d zero=%d hidden=%lld layers=%lld batch=%lld state_bytes=%lld (rank 0: %lld)%s\n",
                  layout.world, layout.tp, layout.dp, model.zero, static_cast<long long>(flags.hidden),
                  static_cast<long long>(flags.layers), static_cast<long long>(flags.batch), all_bytes,
                  rank_bytes, flags.no_memento ? " no-memento" : "");
      std::fflush(stdout);
    }
  }

  std::unique_ptr<memento::Client> client;
  if (!flags.no_memento) client = ConnectAndRegister(layout, model, blobs);

  int64_t done = 0;  // steps applied to the state
  std::vector<float> reduce_scratch;
  if (flags.restore) {
    Result<memento::RestoreResult> restored = client->Restore(*flags.restore);
    if (restored.ok()) {
      // Every rank receives the same agreed list; one copy is enough.
      if (layout.rank == 0) {
        for (const std::string& refused : restored->refused) std::printf("%s\n", refused.c_str());
      }
      done = restored->step;
      // ZeRO-3 restored only this rank's parts of the values.
      if (model.zero == 3) GatherValues(model, layout, &reduce_scratch);
      Check(layout, "restored step " + std::to_string(done),
            LoadBlobs(blobs, done, global_batch, &data));
      if (root) std::printf("restored step=%lld\n", static_cast<long long>(done));
    } else if (restored.status().code() == memento::StatusCode::kNotFound) {
      // Restore leaves the buffers alone when it finds nothing; start over anyway, to be sure.
      Check(layout, "initializing the model", InitModel(model, flags.seed));
      data = MakeDataLoader(flags.seed, layout);
      Check(layout, "saving the blobs", SaveBlobs(data, 0, &blobs));
      if (root) {
        std::printf("nothing to restore (%s); starting from step 1\n",
                    restored.status().ToString().c_str());
      }
    } else {
      Die(layout, "Restore", restored.status());
    }
    std::fflush(stdout);
  }

  Workspace work = MakeWorkspace(model, flags.batch);
  double total_seconds = 0;
  int64_t timed_steps = 0;
  for (int64_t step = done + 1; step <= flags.steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    NextBatch(data, layout, flags.batch, flags.hidden, flags.seed, work);
    model.grad.back() = ForwardBackward(model, layout, flags.batch, work);
    AverageGradients(model, layout, &reduce_scratch);
    const float loss = model.grad.back();
    if (client) {
      Check(layout, "WaitUntilSafeToUpdate before step " + std::to_string(step),
            client->WaitUntilSafeToUpdate());
    }
    AdamStep(model, step, owned);
    GatherValues(model, layout, &reduce_scratch);
    done = step;
    const bool snapshot = flags.snapshot_every > 0 && step % flags.snapshot_every == 0;
    if (client && snapshot) {
      Check(layout, "saving the blobs", SaveBlobs(data, step, &blobs));
      Check(layout, "Snapshot(" + std::to_string(step) + ")", client->Snapshot(step));
    }
    if (step == flags.crash_at_step && (flags.crash_rank < 0 || flags.crash_rank == layout.rank)) {
      std::fprintf(stderr, "%s: rank %d: crashing at step %lld (--crash-at-step)\n", kProgram,
                   layout.rank, static_cast<long long>(step));
      std::fflush(stderr);
      std::fflush(stdout);
      std::raise(SIGKILL);
    }
    if (flags.step_ms > 0) std::this_thread::sleep_until(start + std::chrono::milliseconds(flags.step_ms));
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    total_seconds += seconds;
    ++timed_steps;
    if (root && !flags.quiet) {
      std::printf("step %lld loss=%.6f ms=%.2f%s\n", static_cast<long long>(step), loss,
                  seconds * 1e3, client && snapshot ? " snapshot" : "");
      std::fflush(stdout);
    }
  }
  if (client) Check(layout, "final WaitUntilSafeToUpdate", client->WaitUntilSafeToUpdate());

  // state_hash: FNV-1a over the layout, every rank's state hash in rank order, the step and the
  // data position.
  const uint64_t mine = RankStateHash(model, data);
  std::vector<uint64_t> all(root ? static_cast<size_t>(layout.world) : 0);
  MPI_Gather(&mine, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  if (root) {
    Fnv1a64 h;
    h.AddValue(static_cast<int64_t>(layout.world));
    h.AddValue(static_cast<int64_t>(layout.tp));
    for (uint64_t r : all) h.AddValue(r);
    h.AddValue(done);
    h.AddValue(data.next_sample);
    if (!flags.quiet && timed_steps > 0) {
      std::printf("steps=%lld avg_step_ms=%.2f\n", static_cast<long long>(timed_steps),
                  total_seconds * 1e3 / static_cast<double>(timed_steps));
    }
    std::printf("state_hash=%016llx\n", static_cast<unsigned long long>(h.value()));
    std::fflush(stdout);
  }
  const uint64_t global = GlobalStateHash(model, layout, data, done);
  if (root) {
    std::printf("global_state_hash=%016llx\n", static_cast<unsigned long long>(global));
    std::fflush(stdout);
  }
  client.reset();
  MPI_Comm_free(&layout.tp_comm);
  MPI_Comm_free(&layout.dp_comm);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int rc = Run(argc, argv);
  MPI_Finalize();
  return rc;
}
