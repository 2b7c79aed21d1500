// The `memento` CLI's ecosystem commands, run as a process: convert --from/--to over the DeepSpeed,
// torch and safetensors fixtures, and diff (exit codes, output lines, JSON, usage errors).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "tests/converters/test_util.h"

namespace memento {
namespace {

using test::Slurp;
using test::Quote;

struct Output {
  int exit_code = -1;
  std::string out;
  std::string err;
};

std::string Fixture(const std::string& name) { return std::string(MEMENTO_SOURCE_DIR) + "/tests/converters/fixtures/" + name; }

std::string LastLine(const std::string& s) {
  std::string t = s;
  while (!t.empty() && t.back() == '\n') t.pop_back();
  const size_t nl = t.rfind('\n');
  return nl == std::string::npos ? t : t.substr(nl + 1);
}

class EcosystemCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("MEMENTO_TEST_TMP");
    const std::string base = tmp != nullptr ? tmp : ::testing::TempDir();
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    root_ = base + "/" + info->test_suite_name() + "." + info->name();
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
    if (!std::filesystem::exists(Fixture("deepspeed/tp2_pp2_dp2_zero1"))) GTEST_SKIP() << "no DeepSpeed fixtures";
  }

  Output Run(const std::string& args) {
    const std::string err_path = root_ + "/.stderr";
    const std::string cmd = "cd " + Quote(root_) + " && " + std::string(MEMENTO_BIN_DIR) + "/memento " + args + " 2>" + Quote(err_path);
    Output o;
    FILE* p = ::popen(cmd.c_str(), "r");
    if (p == nullptr) {
      ADD_FAILURE() << "popen " << cmd;
      return o;
    }
    char buf[4096];
    size_t n = 0;
    while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) o.out.append(buf, n);
    const int status = ::pclose(p);
    o.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    o.err = Slurp(err_path);
    return o;
  }

  std::string root_;
};

TEST_F(EcosystemCliTest, DeepSpeedToUniversalLayoutAndBack) {
  const std::string ds = Fixture("deepspeed/tp2_pp2_dp2_zero1");
  Output o = Run("convert --from deepspeed " + Quote(ds) + " --to deepspeed-universal out/universal");
  ASSERT_EQ(o.exit_code, 0) << o.err;
  EXPECT_EQ(o.out.substr(0, o.out.find(" in ")),
            "converted " + ds + " (deepspeed) to out/universal (deepspeed-universal): DeepSpeed ZeRO-1 tp 2 pp 2 dp 2, 12 parameters; "
            "DeepSpeed universal layout: 53 files");
  EXPECT_EQ(Slurp(root_ + "/out/latest_universal"), "universal");
  // Only the output and latest_universal: no temporary directory left.
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(root_ + "/out")) entries += e.path().filename().string()[0] == '.' ? 100 : 1;
  EXPECT_EQ(entries, 2);

  o = Run("convert --json --from deepspeed " + Quote(ds) + " --to ucp ucp");
  ASSERT_EQ(o.exit_code, 0) << o.err;
  EXPECT_EQ(o.out.substr(0, o.out.find(",\"gather_seconds\"")),
            "{\"source\":\"" + ds + "\",\"from\":\"deepspeed\",\"out\":\"ucp\",\"to\":\"ucp\",\"tp\":2,\"pp\":2,\"dp\":2,\"zero_stage\":1,"
            "\"params\":12,\"iteration\":7,\"unmatched_patterns\":[],\"tensor_bytes\":18960,\"largest_tensor_bytes\":1600");

  // The two agree tensor by tensor (values and Adam states, step).
  o = Run("diff ucp out/universal");
  EXPECT_EQ(o.exit_code, 0) << o.out << o.err;
  EXPECT_EQ(LastLine(o.out), "0 of 48 tensors differ");
  EXPECT_NE(o.out.find("\n0.attn.qkv.weight.exp_avg                             [16,8]  0        0        equal\n"), std::string::npos) << o.out;

  // bf16 safetensors differ from the fp32 values beyond a zero tolerance, not beyond 1e-2 relative.
  o = Run("convert --from memento ucp --to safetensors st --dtype bf16 --shard-gb 0.000001");
  ASSERT_EQ(o.exit_code, 0) << o.err;
  EXPECT_TRUE(std::filesystem::exists(root_ + "/st/model.safetensors.index.json"));
  EXPECT_TRUE(std::filesystem::exists(root_ + "/st/model-00001-of-00004.safetensors"));
  o = Run("convert --from safetensors st --to ucp st_ucp");
  ASSERT_EQ(o.exit_code, 0) << o.err;
  o = Run("diff st st_ucp");
  EXPECT_EQ(o.exit_code, 0) << o.out;
  EXPECT_EQ(LastLine(o.out), "0 of 12 tensors differ");
  o = Run("diff --json ucp st");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.out.find("{\"name\":\"0.attn.dense.weight\",\"result\":\"differs\",\"shape\":\"[8,8]\""), std::string::npos) << o.out;
  EXPECT_NE(o.out.find("{\"name\":\"0.attn.dense.weight.exp_avg\",\"result\":\"only in A\""), std::string::npos) << o.out;
  EXPECT_NE(o.out.find("\"differing\":48}"), std::string::npos) << o.out;
  o = Run("diff --rtol 0.01 st_ucp ucp");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(LastLine(o.out), "36 of 48 tensors differ");  // the 36 optimizer states are only in B
}

TEST_F(EcosystemCliTest, TorchFileAndErrors) {
  Output o = Run("convert --from torch " + Quote(Fixture("torch_save_plain.pt")) + " --to ucp t");
  ASSERT_EQ(o.exit_code, 0) << o.err;
  o = Run("diff " + Quote(Fixture("torch_save_plain.pt")) + " t");
  EXPECT_EQ(o.exit_code, 0) << o.out;
  EXPECT_EQ(o.out, "TENSOR  SHAPE  MAX_ABS  MAX_REL  RESULT\nbf16    [3]    0        0        equal\nw       [3,4]  0        0        equal\n"
                   "wt      [4,3]  0        0        equal\n0 of 3 tensors differ\n");

  o = Run("convert --from deepspeed x --to nope y");
  EXPECT_EQ(o.exit_code, 2);
  EXPECT_EQ(o.err.substr(0, o.err.find('\n')),
            "memento convert: unknown target format 'nope' (supported: ucp, deepspeed-universal, safetensors)");
  o = Run("convert --from caffe x --to ucp y");
  EXPECT_EQ(o.exit_code, 2);
  EXPECT_EQ(o.err.substr(0, o.err.find('\n')), "memento convert: unknown source format 'caffe' (supported: memento, deepspeed, torch, safetensors)");
  o = Run("convert --from deepspeed nowhere --to ucp y");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.err, "memento convert: nowhere: no such DeepSpeed checkpoint directory\n");
  o = Run("convert --from torch " + Quote(Fixture("torch_save_plain.pt")) + " --to ucp t");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.err, "memento convert: t already exists; the conversion needs a new path\n");
  o = Run("diff nowhere t");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.err, "memento diff: nowhere: no such file or directory\n");
  o = Run("diff t");
  EXPECT_EQ(o.exit_code, 2);
  EXPECT_EQ(o.err.substr(0, o.err.find('\n')), "memento diff: expected two checkpoints <A> <B>");
  // A hostile torch file: nothing runs, the error names it.
  const std::string evil = root_ + "/evil.pt";
  std::ofstream(evil, std::ios::binary) << std::string("\x80\x02" "cos\nsystem\n(X\x05\x00\x00\x00" "touchtR.", 27);
  o = Run("convert --from torch " + Quote(evil) + " --to ucp e");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.err, "memento convert: " + evil + ": a legacy (pre-1.6, non-zip) torch.save file; not supported: load and re-save it with a current PyTorch\n");
}

}  // namespace
}  // namespace memento
