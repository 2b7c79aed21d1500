// Round trips of DeepSpeed checkpoints written by torch.save (fixtures/make_deepspeed_fixtures.py):
// DeepSpeed -> memento universal -> DeepSpeed universal layout -> read back, every tensor equal to
// the fixture's expected.pt; and the errors of missing, hostile and existing paths.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "converters/deepspeed.h"
#include "converters/torch_zip.h"
#include "core/file_system.h"
#include "core/shard.h"
#include "ucp_format/universal.h"

#include "tests/converters/test_util.h"

namespace memento {
namespace {

using test::Slurp;
using test::TestRoot;

std::string FixtureDir(const std::string& layout) {
  return std::string(MEMENTO_SOURCE_DIR) + "/tests/converters/fixtures/deepspeed/" + layout;
}

struct Expected {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<uint8_t> states[3];
};

constexpr const char* kStates[3] = {"fp32", "exp_avg", "exp_avg_sq"};

std::vector<Expected> LoadExpected(const std::string& layout) {
  std::vector<Expected> out;
  Result<std::unique_ptr<TorchFile>> f = TorchFile::Open(PosixFileSystem(), FixtureDir(layout) + "/expected.pt");
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  if (!f.ok()) return out;
  for (const auto& [k, v] : (*f)->root().entries) {
    Expected e;
    e.name = k->s;
    for (int s = 0; s < 3; ++s) {
      const PickleValue* t = v->Get(kStates[s]);
      EXPECT_NE(t, nullptr);
      e.shape = t->tensor.size;
      Result<std::vector<uint8_t>> b = (*f)->ReadTensor(t->tensor);
      EXPECT_TRUE(b.ok());
      e.states[s] = *b;
    }
    out.push_back(std::move(e));
  }
  return out;
}

struct Layout {
  const char* name;
  int tp, pp, dp, stage;
};

class DeepSpeedRoundTrip : public ::testing::TestWithParam<Layout> {};

TEST_P(DeepSpeedRoundTrip, ImportExportReadBackEqual) {
  const Layout& l = GetParam();
  if (!std::filesystem::exists(FixtureDir(l.name))) GTEST_SKIP() << "no fixture " << FixtureDir(l.name);
  FileSystem* fs = PosixFileSystem();
  const std::string root = TestRoot();
  const std::vector<Expected> expected = LoadExpected(l.name);
  ASSERT_EQ(expected.size(), 12u);

  // DeepSpeed -> memento universal.
  const std::string ucp = root + "/ucp";
  Result<DeepSpeedImportSummary> s = ImportDeepSpeed(fs, FixtureDir(l.name), ucp);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->tag_dir, FixtureDir(l.name) + "/global_step7");
  EXPECT_EQ(s->tp, l.tp);
  EXPECT_EQ(s->pp, l.pp);
  EXPECT_EQ(s->dp, l.dp);
  EXPECT_EQ(s->zero_stage, l.stage);
  EXPECT_EQ(s->iteration, 7);
  EXPECT_EQ(s->params, 12);
  EXPECT_TRUE(s->unmatched_patterns.empty()) << s->unmatched_patterns[0];
  Result<std::vector<std::string>> problems = VerifyUniversal(fs, ucp);
  ASSERT_TRUE(problems.ok()) << problems.status().ToString();
  EXPECT_TRUE(problems->empty());
  Result<proto::UniversalManifest> m = ReadUniversalManifest(fs, ucp);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->params_size(), 12);
  EXPECT_EQ(m->source().step(), 7);
  for (const Expected& e : expected) {
    for (int st = 0; st < 3; ++st) {
      Result<std::vector<uint8_t>> got = ReadUniversalTensor(fs, ucp, *m, e.name, kStates[st]);
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      EXPECT_TRUE(*got == e.states[st]) << e.name << " " << kStates[st];
    }
    Result<std::vector<uint8_t>> step = ReadUniversalTensor(fs, ucp, *m, e.name, "step");
    ASSERT_TRUE(step.ok());
    float x = 0;
    std::memcpy(&x, step->data(), 4);
    EXPECT_EQ(x, 7.0f);
  }
  // No temporary directory left next to the output.
  int entries = 0;
  for (const auto& d : std::filesystem::directory_iterator(root)) entries += d.path().filename() == "ucp" ? 0 : 1;
  EXPECT_EQ(entries, 0);

  // memento universal -> DeepSpeed universal layout -> read back.
  const std::string dsu = root + "/universal";
  Result<DeepSpeedExportSummary> x = ExportDeepSpeedUniversal(fs, ucp, dsu);
  ASSERT_TRUE(x.ok()) << x.status().ToString();
  EXPECT_EQ(x->params, 12);
  EXPECT_EQ(Slurp(root + "/latest_universal"), "universal");
  const PickleLimits strict{.strict_globals = true};
  for (const Expected& e : expected) {
    for (int st = 0; st < 3; ++st) {
      const std::string path = dsu + "/zero/" + e.name + "/" + kStates[st] + ".pt";
      Result<std::unique_ptr<TorchFile>> f = TorchFile::Open(fs, path, strict);
      ASSERT_TRUE(f.ok()) << f.status().ToString();
      const PickleValue* param = (*f)->root().Get("param");
      ASSERT_NE(param, nullptr) << path;
      EXPECT_EQ(param->tensor.size, e.shape) << path;
      Result<std::vector<uint8_t>> b = (*f)->ReadTensor(param->tensor);
      ASSERT_TRUE(b.ok());
      EXPECT_TRUE(*b == e.states[st]) << path;
      const PickleValue& r = (*f)->root();
      if (e.name.find("word_embeddings") != std::string::npos) {
        ASSERT_NE(r.Get("vocab_tensor"), nullptr);
        EXPECT_TRUE(r.Get("vocab_tensor")->b);
        EXPECT_EQ(r.Get("cat_dim")->i, 0);
      } else if (e.name.find("qkv") != std::string::npos) {
        // DeepSpeed's SubparamShape object, as ds_to_universal.py saves it: the pattern that
        // matched, shape ((q, k, v), hidden) with tuples, partition_dim.
        const PickleValue* sp = r.Get("sub_param_shape");
        ASSERT_NE(sp, nullptr);
        EXPECT_EQ(sp->kind, PickleValue::Kind::kObject);
        EXPECT_EQ(sp->name(), "deepspeed.checkpoint.universal_checkpoint.SubparamShape");
        EXPECT_EQ(sp->Get("partition_dim")->i, 0);
        ASSERT_EQ(sp->Get("patterns")->items.size(), 1u);
        EXPECT_EQ(sp->Get("patterns")->items[0]->s, "\\d+\\.attn\\.qkv\\.weight");
        const PickleValue* shape = sp->Get("shape");
        ASSERT_EQ(shape->kind, PickleValue::Kind::kTuple);
        ASSERT_EQ(shape->items.size(), 2u);
        ASSERT_EQ(shape->items[0]->kind, PickleValue::Kind::kTuple);
        ASSERT_EQ(shape->items[0]->items.size(), 3u);
        EXPECT_EQ(shape->items[0]->items[0]->i, 8);
        EXPECT_EQ(shape->items[0]->items[1]->i, 4);
        EXPECT_EQ(shape->items[0]->items[2]->i, 4);
        EXPECT_EQ(shape->items[1]->i, 8);
        EXPECT_EQ(r.Get("cat_dim"), nullptr);
      } else if (e.name.find("gate_up") != std::string::npos) {
        EXPECT_EQ(r.Get("param_n_sub_params")->i, 2);
      } else if (e.name.find("dense") != std::string::npos || e.name.find("down") != std::string::npos) {
        EXPECT_EQ(r.Get("cat_dim")->i, 1);
      } else if (e.name.find("ln") != std::string::npos) {
        EXPECT_EQ(r.Get("cat_dim"), nullptr);
      }
    }
    Result<std::unique_ptr<TorchFile>> step = TorchFile::Open(fs, dsu + "/zero/" + e.name + "/step.pt", strict);
    ASSERT_TRUE(step.ok()) << step.status().ToString();
    ASSERT_EQ(step.value()->root().kind, PickleValue::Kind::kTensor);
    EXPECT_TRUE(step.value()->root().tensor.size.empty());
  }
  Result<std::unique_ptr<TorchFile>> osd = TorchFile::Open(fs, dsu + "/zero/optimizer_state.pt", strict);
  ASSERT_TRUE(osd.ok()) << osd.status().ToString();
  const PickleValue* groups = (*osd)->root().Get("param_groups");
  ASSERT_NE(groups, nullptr);
  EXPECT_EQ(groups->items[0]->Get("lr")->f, 1e-3);
  // The model states files are the source's, byte for byte.
  for (int mp = 0; mp < l.tp * l.pp; ++mp) {
    const std::string name = "mp_rank_0" + std::to_string(mp) + "_model_states.pt";
    const std::string src = l.stage == 3 ? FixtureDir(l.name) + "/global_step7/zero_pp_rank_0_mp_rank_00_model_states.pt"
                                         : FixtureDir(l.name) + "/global_step7/" + name;
    EXPECT_EQ(Slurp(dsu + "/" + name), Slurp(src)) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DeepSpeedRoundTrip,
                         ::testing::Values(Layout{"tp2_pp2_dp2_zero1", 2, 2, 2, 1}, Layout{"tp2_dp2_zero2", 2, 1, 2, 2},
                                           Layout{"dp2_zero3", 1, 1, 2, 3}),
                         [](const ::testing::TestParamInfo<Layout>& i) { return std::string(i.param.name); });

TEST(DeepSpeedImportTest, ErrorsNameThePath) {
  if (!std::filesystem::exists(FixtureDir("tp2_dp2_zero2"))) GTEST_SKIP() << "no fixture";
  FileSystem* fs = PosixFileSystem();
  const std::string root = TestRoot();
  const std::string copy = root + "/ds";
  std::filesystem::copy(FixtureDir("tp2_dp2_zero2"), copy, std::filesystem::copy_options::recursive);
  const std::string tag = copy + "/global_step7";

  // An existing output.
  std::filesystem::create_directories(root + "/exists");
  EXPECT_EQ(ImportDeepSpeed(fs, copy, root + "/exists").status().ToString(),
            "AlreadyExists: " + root + "/exists already exists; the universal checkpoint needs a new path");
  // A hostile optimizer file: a pickle that imports os.system. Nothing runs, nothing is written.
  const std::string victim = tag + "/zero_pp_rank_1_mp_rank_01_optim_states.pt";
  const std::string saved = Slurp(victim);
  const std::string hostile =
      std::string("\x80\x02" "cos\nsystem\n(X", 15) + std::string("\x04\x00\x00\x00", 4) + "truetR.";
  {
    Result<std::unique_ptr<ZipBuilder>> z = ZipBuilder::Create(fs, victim);
    ASSERT_TRUE(z.ok());
    ASSERT_TRUE((*z)->Add("archive/data.pkl", hostile.data(), hostile.size()).ok());
    ASSERT_TRUE((*z)->Finish().ok());
  }
  EXPECT_EQ(ImportDeepSpeed(fs, copy, root + "/out").status().ToString(),
            "InvalidArgument: " + victim + ": archive/data.pkl: pickle at byte 2: imports os.system, which can run code: refused (nothing was run)");
  EXPECT_FALSE(std::filesystem::exists(root + "/out"));
  std::ofstream(victim, std::ios::binary) << saved;
  // A missing DP rank's file.
  std::filesystem::remove(victim);
  EXPECT_EQ(ImportDeepSpeed(fs, copy, root + "/out").status().ToString(), "NotFound: " + victim + ": missing");
  EXPECT_FALSE(std::filesystem::exists(root + "/out"));
  // Not a DeepSpeed directory.
  EXPECT_EQ(ImportDeepSpeed(fs, root + "/exists", root + "/out").status().ToString(),
            "NotFound: " + root + "/exists: no zero_pp_rank_*_mp_rank_*_optim_states.pt files: not a DeepSpeed ZeRO checkpoint");
  // A tag that points outside.
  std::ofstream(copy + "/latest") << "../../etc";
  EXPECT_EQ(ImportDeepSpeed(fs, copy, root + "/out").status().ToString(),
            "InvalidArgument: " + copy + "/latest: tag '../../etc' is not a folder name: refused");
  // Export: an existing output.
  EXPECT_EQ(ExportDeepSpeedUniversal(fs, root + "/nothing", root + "/exists").status().ToString(),
            "AlreadyExists: " + root + "/exists already exists; the DeepSpeed universal checkpoint needs a new path");
}

// Found by tests/fuzz/fuzz_deepspeed.cc: a pickle's str held any bytes, but the manifests' strings
// are Protobuf's, UTF-8 only; the import wrote a manifest.pb that did not parse back (and said it
// succeeded). The pickle machine refuses a str that is not UTF-8, as Python's does.
TEST(DeepSpeedImportTest, NamesThatAreNotUtf8AreRefused) {
  FileSystem* fs = PosixFileSystem();
  const std::string root = TestRoot();
  TorchFileBuilder b;
  Result<PickleValuePtr> t = b.AddTensor(DType::kF32, {2}, std::vector<uint8_t>(8, 0));
  ASSERT_TRUE(t.ok());
  PickleValuePtr top = PyDict(false);
  DictSet(top.get(), "w\xff", *t);
  ASSERT_TRUE(b.Write(fs, root + "/latin1.pt", *top).ok());
  EXPECT_EQ(ImportTorchFile(fs, root + "/latin1.pt", root + "/ucp").status().ToString(),
            "InvalidArgument: " + root + "/latin1.pt: archive/data.pkl: pickle at byte 4: a str that is not UTF-8");
  EXPECT_FALSE(std::filesystem::exists(root + "/ucp"));
}

// A parameter whose name would leave zero/ (here from a torch file's key) is refused by the
// export, and nothing is written outside the output directory.
TEST(DeepSpeedExportTest, ParameterNamesCannotLeaveTheOutput) {
  FileSystem* fs = PosixFileSystem();
  const std::string root = TestRoot();
  TorchFileBuilder b;
  Result<PickleValuePtr> t = b.AddTensor(DType::kF32, {2}, std::vector<uint8_t>(8, 0));
  ASSERT_TRUE(t.ok());
  PickleValuePtr top = PyDict(false);
  DictSet(top.get(), "..", *t);
  ASSERT_TRUE(b.Write(fs, root + "/evil.pt", *top).ok());
  ASSERT_TRUE(ImportTorchFile(fs, root + "/evil.pt", root + "/ucp").ok());
  EXPECT_EQ(ExportDeepSpeedUniversal(fs, root + "/ucp", root + "/out/universal").status().ToString(),
            "InvalidArgument: " + root + "/ucp: parameter name '..' cannot be a folder name under zero/: refused");
  EXPECT_FALSE(std::filesystem::exists(root + "/out/universal"));
  EXPECT_FALSE(std::filesystem::exists(root + "/out/latest_universal"));
  EXPECT_FALSE(std::filesystem::exists(root + "/out/zero"));
  // The universal checkpoint itself escaped the name ("%2E." for a leading '.').
  EXPECT_TRUE(std::filesystem::exists(root + "/ucp/params/%2E..safetensors"));
}


// ---- A DeepSpeed checkpoint with uneven sub-parameter splits --------------------------------------
// No PyTorch on the build machine: this checkpoint is written by memento's own torch writer
// (TorchFileBuilder), in the structure fixtures/make_deepspeed_fixtures.py writes with torch.save,
// tp 2 x dp 2: ZeRO-2 (one parameter group per TP rank flattened, padded to a multiple of 2 x dp and
// cut into dp partitions; param_slice_mappings of DeepSpeed's fragment_address objects) or ZeRO-3
// (each parameter cut on its own into ceil(numel / dp) pieces; fp32_flat_groups);
// universal_checkpoint_info of DeepSpeed's universal checkpoint version 0.4, whose
// sub_param_shard_widths give each sub-parameter's width on each TP rank.

constexpr int kTp = 2, kDp = 2;

struct SynthParam {
  std::string name;
  std::vector<int64_t> shape;  // full, 2-d
  enum Kind { kSubParams, kRowParallel, kAverage } kind;
  std::vector<std::vector<int64_t>> widths;  // kSubParams: rows of each sub-parameter on each TP rank
};

// Deterministic values in [-1, 1), exact in float.
float Value(const std::string& name, int state, int rank, int64_t i) {
  uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  h ^= static_cast<uint64_t>(state * 7919 + rank * 104729) + static_cast<uint64_t>(i) * 0x9e3779b97f4a7c15ull;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 31;
  return static_cast<float>(h >> 40) / static_cast<float>(1 << 24) * 2.0f - 1.0f;
}

std::vector<uint8_t> Bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// TP rank r's slice of state `state` (rows x cols, row-major), and the full (merged) tensor.
std::vector<float> Slice(const SynthParam& p, int state, int r) {
  const int64_t rows = p.shape[0], cols = p.shape[1];
  std::vector<float> out;
  if (p.kind == SynthParam::kAverage) {
    for (int64_t i = 0; i < rows * cols; ++i) out.push_back(Value(p.name, state, r, i));
  } else if (p.kind == SynthParam::kRowParallel) {
    const int64_t w = cols / kTp;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = r * w; j < (r + 1) * w; ++j) out.push_back(Value(p.name, state, 0, i * cols + j));
    }
  } else {
    int64_t sub_start = 0;
    for (const std::vector<int64_t>& w : p.widths) {
      int64_t row = sub_start;
      for (int q = 0; q < r; ++q) row += w[static_cast<size_t>(q)];
      for (int64_t i = row; i < row + w[static_cast<size_t>(r)]; ++i) {
        for (int64_t j = 0; j < cols; ++j) out.push_back(Value(p.name, state, 0, i * cols + j));
      }
      for (int64_t x : w) sub_start += x;
    }
  }
  return out;
}

std::vector<float> Full(const SynthParam& p, int state) {
  const int64_t n = p.shape[0] * p.shape[1];
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out[static_cast<size_t>(i)] = p.kind == SynthParam::kAverage ? (Value(p.name, state, 0, i) + Value(p.name, state, 1, i)) / 2.0f
                                                                 : Value(p.name, state, 0, i);
  }
  return out;
}

std::vector<int64_t> LocalShape(const SynthParam& p, int r) {
  if (p.kind == SynthParam::kAverage) return p.shape;
  if (p.kind == SynthParam::kRowParallel) return {p.shape[0], p.shape[1] / kTp};
  int64_t rows = 0;
  for (const std::vector<int64_t>& w : p.widths) rows += w[static_cast<size_t>(r)];
  return {rows, p.shape[1]};
}

PickleValuePtr Ints(const std::vector<int64_t>& v, bool tuple) {
  std::vector<PickleValuePtr> items;
  for (int64_t x : v) items.push_back(PyInt(x));
  return tuple ? PyTuple(items) : PyList(items);
}

// Writes <root>/latest and <root>/global_step3/... for `params` (ZeRO stage 2 or 3); `uci` is the
// model states' universal_checkpoint_info. `bad_start` >= 0: the first fragment_address of TP rank 0,
// DP rank 0 starts there instead (a hostile file). `extra_state`: one more entry of the ZeRO-2
// optimizer_state_dict (kept by the import as the optimizer's global state).
void WriteZeroCheckpoint(const std::string& root, int stage, const std::vector<SynthParam>& params, const PickleValuePtr& uci,
                         int64_t bad_start = -1, const PickleValuePtr& extra_state = nullptr) {
  FileSystem* fs = PosixFileSystem();
  const std::string tag = root + "/global_step3";
  std::filesystem::create_directories(tag);
  std::ofstream(root + "/latest") << "global_step3";
  for (int r = 0; r < kTp; ++r) {
    const std::string mp = "0" + std::to_string(r);
    PickleValuePtr shapes = PyDict(true);
    for (const SynthParam& p : params) DictSet(shapes.get(), p.name, Ints(LocalShape(p, r), true));
    PickleValuePtr ms = PyDict(false);
    DictSet(ms.get(), "module", PyNone());
    DictSet(ms.get(), "param_shapes", PyList({shapes}));
    DictSet(ms.get(), "iteration", PyInt(3));
    DictSet(ms.get(), "dp_world_size", PyInt(kDp));
    DictSet(ms.get(), "mp_world_size", PyInt(kTp));
    DictSet(ms.get(), "universal_checkpoint_info", uci);
    TorchFileBuilder mb;
    ASSERT_TRUE(mb.Write(fs, tag + "/mp_rank_" + mp + "_model_states.pt", *ms).ok());
    if (stage == 3) {
      // Each parameter's slice padded to a multiple of dp; DP rank d holds piece d of each.
      for (int d = 0; d < kDp; ++d) {
        std::vector<float> flat[3];
        for (int s = 0; s < 3; ++s) {
          for (const SynthParam& p : params) {
            std::vector<float> v = Slice(p, s, r);
            const size_t ps = (v.size() + kDp - 1) / kDp;
            v.resize(ps * kDp, 0.0f);
            flat[s].insert(flat[s].end(), v.begin() + static_cast<std::ptrdiff_t>(d * ps), v.begin() + static_cast<std::ptrdiff_t>((d + 1) * ps));
          }
        }
        TorchFileBuilder b;
        auto tensor = [&](int s) {
          Result<PickleValuePtr> t = b.AddTensor(DType::kF32, {static_cast<int64_t>(flat[s].size())}, Bytes(flat[s]));
          EXPECT_TRUE(t.ok());
          return *t;
        };
        PickleValuePtr st = PyDict(false);
        DictSet(st.get(), "step", PyFloat(3));
        DictSet(st.get(), "exp_avg", tensor(1));
        DictSet(st.get(), "exp_avg_sq", tensor(2));
        PickleValuePtr state = PyDict(false);
        state->entries.emplace_back(PyInt(0), st);
        PickleValuePtr inner = PyDict(false);
        DictSet(inner.get(), "state", state);
        DictSet(inner.get(), "param_groups", PyList({PyDict(false)}));
        PickleValuePtr osd = PyDict(false);
        DictSet(osd.get(), "zero_stage", PyInt(3));
        DictSet(osd.get(), "partition_count", PyInt(kDp));
        DictSet(osd.get(), "optimizer_state_dict", inner);
        DictSet(osd.get(), "fp32_flat_groups", PyList({tensor(0)}));
        PickleValuePtr top = PyDict(false);
        DictSet(top.get(), "optimizer_state_dict", osd);
        ASSERT_TRUE(b.Write(fs, tag + "/zero_pp_rank_" + std::to_string(d) + "_mp_rank_" + mp + "_optim_states.pt", *top).ok());
      }
      continue;
    }
    // The TP rank's flat group, padded to a multiple of 2 x dp, cut into dp partitions.
    std::vector<float> flat[3];
    for (int s = 0; s < 3; ++s) {
      for (const SynthParam& p : params) {
        const std::vector<float> v = Slice(p, s, r);
        flat[s].insert(flat[s].end(), v.begin(), v.end());
      }
    }
    const auto total = static_cast<int64_t>(flat[0].size());
    const int64_t padded = (total + 2 * kDp - 1) / (2 * kDp) * (2 * kDp), part = padded / kDp;
    for (auto& f : flat) f.resize(static_cast<size_t>(padded), 0.0f);
    for (int d = 0; d < kDp; ++d) {
      const int64_t lo = d * part, hi = (d + 1) * part, pad = std::max<int64_t>(0, hi - total);
      TorchFileBuilder b;
      auto part_of = [&](int s, int64_t n) {
        std::vector<float> v(flat[s].begin() + lo, flat[s].begin() + lo + n);
        Result<PickleValuePtr> t = b.AddTensor(DType::kF32, {n}, Bytes(v));
        EXPECT_TRUE(t.ok());
        return *t;
      };
      PickleValuePtr maps = PyDict(true);
      int64_t off = 0;
      for (const SynthParam& p : params) {
        const int64_t numel = NumElements(LocalShape(p, r));
        const int64_t a = std::max(off, lo), e = std::min(off + numel, hi);
        if (a < e) {
          PickleValuePtr fa = PyDataclass("deepspeed.utils.tensor_fragment.fragment_address");
          DictSet(fa.get(), "numel", PyInt(e - a));
          DictSet(fa.get(), "start", PyInt(bad_start >= 0 && r == 0 && d == 0 && off == 0 ? bad_start : a - lo));
          DictSet(maps.get(), p.name, fa);
        }
        off += numel;
      }
      PickleValuePtr st = PyDict(false);
      DictSet(st.get(), "step", PyFloat(3));
      DictSet(st.get(), "exp_avg", part_of(1, part));
      DictSet(st.get(), "exp_avg_sq", part_of(2, part));
      PickleValuePtr state = PyDict(false);
      state->entries.emplace_back(PyInt(0), st);
      PickleValuePtr group = PyDict(false);
      DictSet(group.get(), "lr", PyFloat(1e-3));
      DictSet(group.get(), "params", PyList({PyInt(0)}));
      PickleValuePtr base = PyDict(false);
      DictSet(base.get(), "state", state);
      DictSet(base.get(), "param_groups", PyList({group}));
      PickleValuePtr osd = PyDict(false);
      DictSet(osd.get(), "base_optimizer_state", base);
      DictSet(osd.get(), "single_partition_of_fp32_groups", PyList({part_of(0, part - pad)}));
      DictSet(osd.get(), "param_slice_mappings", PyList({maps}));
      DictSet(osd.get(), "zero_stage", PyInt(2));
      DictSet(osd.get(), "partition_count", PyList({PyInt(kDp)}));
      DictSet(osd.get(), "group_paddings", PyList({PyInt(pad)}));
      if (extra_state != nullptr) DictSet(osd.get(), "extra_state", extra_state);
      PickleValuePtr top = PyDict(false);
      DictSet(top.get(), "optimizer_state_dict", osd);
      ASSERT_TRUE(b.Write(fs, tag + "/zero_pp_rank_" + std::to_string(d) + "_mp_rank_" + mp + "_optim_states.pt", *top).ok());
    }
  }
}

// GQA fused QKV whose heads do not split evenly over tp 2 (head size 2): 6 query heads [3, 3],
// 3 key/value heads [2, 1] each, so q, k, v have 12, 6, 6 rows and each TP rank's slice 14 or 10;
// a second QKV of 8, 3, 3 rows (sizes not divisible by tp); a row-parallel weight of 80 rows (more
// runs than are read one by one) and an averaged one.
std::vector<SynthParam> UnevenParams() {
  return {{"0.attn.qkv.weight", {24, 4}, SynthParam::kSubParams, {{6, 6}, {4, 2}, {4, 2}}},
          {"1.attn.qkv.weight", {14, 4}, SynthParam::kSubParams, {{4, 4}, {2, 1}, {2, 1}}},
          {"0.attn.dense.weight", {80, 6}, SynthParam::kRowParallel, {}},
          {"0.router.weight", {3, 4}, SynthParam::kAverage, {}}};
}

PickleValuePtr UnevenInfo(bool with_widths) {
  PickleValuePtr uci = PyDict(false);
  DictSet(uci.get(), "universal_checkpoint_version", PyFloat(0.4));
  DictSet(uci.get(), "parameter_with_row_parallelism_patterns", PyList({PyStr("\\d+\\.attn\\.dense\\.weight")}));
  DictSet(uci.get(), "parameter_to_average_patterns", PyList({PyStr("\\d+\\.router\\.weight")}));
  // As Megatron-DeepSpeed writes them: dicts that DeepSpeed turns into SubparamShape(**d).
  PickleValuePtr sub0 = PyDict(false);
  DictSet(sub0.get(), "patterns", PyList({PyStr("0\\.attn\\.qkv\\.weight")}));
  DictSet(sub0.get(), "shape", PyTuple({Ints({12, 6, 6}, true), PyInt(4)}));
  DictSet(sub0.get(), "partition_dim", PyInt(0));
  PickleValuePtr sub1 = PyDict(false);
  DictSet(sub1.get(), "patterns", PyList({PyStr("1\\.attn\\.qkv\\.weight")}));
  DictSet(sub1.get(), "shape", PyTuple({Ints({8, 3, 3}, true), PyInt(4)}));
  DictSet(sub1.get(), "partition_dim", PyInt(0));
  DictSet(uci.get(), "parameter_with_sub_params", PyList({sub0, sub1}));
  if (with_widths) {
    PickleValuePtr widths = PyDict(false);
    DictSet(widths.get(), "0\\.attn\\.qkv\\.weight", PyList({Ints({6, 6}, false), Ints({4, 2}, false), Ints({4, 2}, false)}));
    DictSet(widths.get(), "1\\.attn\\.qkv\\.weight", PyList({Ints({4, 4}, false), Ints({2, 1}, false), Ints({2, 1}, false)}));
    DictSet(uci.get(), "sub_param_shard_widths", widths);
  }
  return uci;
}

class DeepSpeedUnevenTest : public ::testing::TestWithParam<int> {};

TEST_P(DeepSpeedUnevenTest, GqaShardWidthsRoundTrip) {
  FileSystem* fs = PosixFileSystem();
  const std::string root = TestRoot();
  const int stage = GetParam();
  const std::vector<SynthParam> params = UnevenParams();
  WriteZeroCheckpoint(root + "/ds", stage, params, UnevenInfo(true));

  // DeepSpeed -> memento universal: every state equal to the full tensor.
  Result<DeepSpeedImportSummary> s = ImportDeepSpeed(fs, root + "/ds", root + "/ucp");
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->tp, 2);
  EXPECT_EQ(s->dp, 2);
  EXPECT_EQ(s->zero_stage, stage);
  EXPECT_EQ(s->params, 4);
  EXPECT_TRUE(s->unmatched_patterns.empty());
  Result<std::vector<std::string>> problems = VerifyUniversal(fs, root + "/ucp");
  ASSERT_TRUE(problems.ok());
  EXPECT_TRUE(problems->empty());
  Result<proto::UniversalManifest> m = ReadUniversalManifest(fs, root + "/ucp");
  ASSERT_TRUE(m.ok());
  for (const SynthParam& p : params) {
    for (int st = 0; st < 3; ++st) {
      Result<std::vector<uint8_t>> got = ReadUniversalTensor(fs, root + "/ucp", *m, p.name, kStates[st]);
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      EXPECT_TRUE(*got == Bytes(Full(p, st))) << p.name << " " << kStates[st];
    }
  }
  for (const proto::UniversalParam& p : m->params()) {
    if (p.name() != "0.attn.qkv.weight") continue;
    EXPECT_EQ(p.source_layout(), "deepspeed zero-" + std::to_string(stage) + " tp 2 pp 1 dp 2: sub_params [12,6,6] dim 0");
    EXPECT_EQ(p.states(0).shape(0), 24);
  }

  // -> DeepSpeed universal layout -> read back: every tensor equal, the sub-parameter sizes in
  // SubparamShape.shape (DeepSpeed's loader re-splits each one over the new TP degree).
  ASSERT_TRUE(ExportDeepSpeedUniversal(fs, root + "/ucp", root + "/out/universal").ok());
  const PickleLimits strict{.strict_globals = true};
  for (const SynthParam& p : params) {
    for (int st = 0; st < 3; ++st) {
      const std::string path = root + "/out/universal/zero/" + p.name + "/" + kStates[st] + ".pt";
      Result<std::unique_ptr<TorchFile>> f = TorchFile::Open(fs, path, strict);
      ASSERT_TRUE(f.ok()) << f.status().ToString();
      const PickleValue* param = (*f)->root().Get("param");
      ASSERT_NE(param, nullptr);
      EXPECT_EQ(param->tensor.size, p.shape) << path;
      Result<std::vector<uint8_t>> b = (*f)->ReadTensor(param->tensor);
      ASSERT_TRUE(b.ok());
      EXPECT_TRUE(*b == Bytes(Full(p, st))) << path;
      const PickleValue* sp = (*f)->root().Get("sub_param_shape");
      if (p.kind != SynthParam::kSubParams) {
        EXPECT_EQ(sp, nullptr) << path;
        continue;
      }
      ASSERT_NE(sp, nullptr) << path;
      EXPECT_EQ(sp->name(), "deepspeed.checkpoint.universal_checkpoint.SubparamShape");
      const PickleValue* sizes = sp->Get("shape")->items[0].get();
      std::vector<int64_t> got_sizes;
      for (const auto& x : sizes->items) got_sizes.push_back(x->i);
      EXPECT_EQ(got_sizes, p.name[0] == '0' ? (std::vector<int64_t>{12, 6, 6}) : (std::vector<int64_t>{8, 3, 3}));
      EXPECT_EQ(sp->Get("shape")->items[1]->i, 4);
    }
  }
  Result<std::unique_ptr<TorchFile>> avg = TorchFile::Open(fs, root + "/out/universal/zero/0.router.weight/fp32.pt", strict);
  ASSERT_TRUE(avg.ok());
  EXPECT_EQ((*avg)->root().Get("cat_dim"), nullptr);
}

INSTANTIATE_TEST_SUITE_P(Zero, DeepSpeedUnevenTest, ::testing::Values(2, 3),
                         [](const ::testing::TestParamInfo<int>& i) { return "stage" + std::to_string(i.param); });

TEST(DeepSpeedUnevenImportTest, UnevenSplitWithoutShardWidthsIsRefused) {
  FileSystem* fs = PosixFileSystem();
  const std::string root = TestRoot();
  WriteZeroCheckpoint(root + "/ds", 2, UnevenParams(), UnevenInfo(false));
  EXPECT_EQ(ImportDeepSpeed(fs, root + "/ds", root + "/ucp").status().ToString(),
            "FailedPrecondition: parameter '0.attn.qkv.weight': TP rank 0's slice [14,4] has 14 on dim 0, its sub-parameter widths add up "
            "to 12 (an even split: universal_checkpoint_info has no sub_param_shard_widths for its pattern)");
  EXPECT_FALSE(std::filesystem::exists(root + "/ucp"));
}

// A fragment_address that points past its partition is refused before anything is read or
// allocated for it, naming the file, parameter and state.
TEST(DeepSpeedUnevenImportTest, FragmentOutsideItsPartitionIsRefused) {
  const std::string root = TestRoot();
  WriteZeroCheckpoint(root + "/ds", 2, UnevenParams(), UnevenInfo(true), int64_t{1} << 62);
  EXPECT_EQ(ImportDeepSpeed(PosixFileSystem(), root + "/ds", root + "/ucp").status().ToString(),
            "DataLoss: " + root + "/ds/global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt: parameter '0.attn.qkv.weight' fp32: "
            "56 elements from 4611686018427387904 outside the flat partition of 170");
  EXPECT_FALSE(std::filesystem::exists(root + "/ucp"));
}

// Found with tests/fuzz (fuzz_pickle timed out writing an unpickled value): a pickle's memo shares
// a container many times, so 30 levels of [x, x] are 30 containers but 2^30 paths. The import
// copied the optimizer's global state path by path and the writer wrote it so: neither finished.
TEST(DeepSpeedUnevenImportTest, SharedContainersInTheOptimizerStateAreCopiedOnce) {
  const std::string root = TestRoot();
  PickleValuePtr shared = PyList({PyInt(7)});
  for (int level = 0; level < 30; ++level) shared = PyList({shared, shared});
  PickleValuePtr uci = PyDict(false);
  DictSet(uci.get(), "parameter_with_row_parallelism_patterns", PyList({PyStr("w")}));
  WriteZeroCheckpoint(root + "/ds", 2, {{"w", {4, 4}, SynthParam::kRowParallel, {}}}, uci, -1, shared);
  const auto start = std::chrono::steady_clock::now();
  Result<DeepSpeedImportSummary> s = ImportDeepSpeed(PosixFileSystem(), root + "/ds", root + "/ucp");
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  Result<std::vector<std::string>> problems = VerifyUniversal(PosixFileSystem(), root + "/ucp");
  ASSERT_TRUE(problems.ok());
  EXPECT_TRUE(problems->empty());
}

// universal_checkpoint_info patterns come from the checkpoint file. Matched by backtracking
// (std::regex's default), "(a|aa)*c" against a parameter name of 64 'a's did not finish; found by
// tests/fuzz (fuzz_pattern_spec hung in the same engine).
TEST(DeepSpeedUnevenImportTest, HostilePatternsMatchInPolynomialTime) {
  const std::string root = TestRoot();
  PickleValuePtr uci = PyDict(false);
  DictSet(uci.get(), "tp_replicated_parameter_patterns", PyList({PyStr("(a|aa)*c")}));
  DictSet(uci.get(), "parameter_with_row_parallelism_patterns", PyList({PyStr("a+")}));
  WriteZeroCheckpoint(root + "/ds", 2, {{std::string(64, 'a'), {4, 4}, SynthParam::kRowParallel, {}}}, uci);
  const auto start = std::chrono::steady_clock::now();
  Result<DeepSpeedImportSummary> s = ImportDeepSpeed(PosixFileSystem(), root + "/ds", root + "/ucp");
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  EXPECT_EQ(s->unmatched_patterns, std::vector<std::string>{"tp_replicated_parameter_patterns: (a|aa)*c"});
  // A back-reference needs backtracking: refused as a bad pattern.
  DictSet(uci.get(), "parameter_to_average_patterns", PyList({PyStr("(a)\\1")}));
  WriteZeroCheckpoint(root + "/ds2", 2, {{"aa", {4, 4}, SynthParam::kRowParallel, {}}}, uci);
  Result<DeepSpeedImportSummary> refused = ImportDeepSpeed(PosixFileSystem(), root + "/ds2", root + "/ucp2");
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument) << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("universal_checkpoint_info.parameter_to_average_patterns pattern '(a)\\1'"),
            std::string::npos)
      << refused.status().ToString();
}

}  // namespace
}  // namespace memento
