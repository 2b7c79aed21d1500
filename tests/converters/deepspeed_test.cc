// Round trips of DeepSpeed checkpoints written by torch.save (fixtures/make_deepspeed_fixtures.py):
// DeepSpeed -> memento universal -> DeepSpeed universal layout -> read back, every tensor equal to
// the fixture's expected.pt; and the errors of missing, hostile and existing paths.
#include <gtest/gtest.h>

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
        const PickleValue* sp = r.Get("sub_param_shape");
        ASSERT_NE(sp, nullptr);
        EXPECT_EQ(sp->Get("partition_dim")->i, 0);
        EXPECT_EQ(sp->Get("shape")->items[0]->items.size(), 3u);
        EXPECT_EQ(sp->Get("shape")->items[0]->items[1]->i, 4);
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

}  // namespace
}  // namespace memento
