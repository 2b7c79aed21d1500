// End to end: memento-train-example (4 ranks under mpirun, 2 agents) saves under (tp 2, dp 2,
// zero 1); a restart with another layout restores from storage through the agents (box
// intersection onto ZeRO-3 partitions) and training continues to the same consolidated state as a
// run that never changed layout; then back to the original layout, bitwise the same per-rank state.
// The persisted native checkpoint also converts to a universal checkpoint whose tensors match what
// the resumed run restored.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <utility>

#include "integration/harness.h"
#include "ucp_format/native_checkpoint.h"
#include "ucp_format/universal.h"

namespace memento::testing {
namespace {

namespace fs = std::filesystem;

std::string Hash(const std::string& out, const std::string& key) {
  const size_t p = out.find("\n" + key + "=");
  if (p == std::string::npos) {
    ADD_FAILURE() << "no " << key << " line in:" << out;
    return "";
  }
  return out.substr(p + 1, key.size() + 17);
}

class ReshardResumeTest : public ::testing::Test {
 protected:
  std::pair<int, std::string> Train(const std::string& job, const std::string& sockets, const std::string& args) {
    const std::string out = TestTmp() + "/" + job + ".out";
    std::string env = "MEMENTO_RANKS_PER_NODE=2 ";
    if (!sockets.empty()) env += "MEMENTO_JOB_ID=" + job + " MEMENTO_AGENT_SOCKET=" + sockets + " ";
    const std::string cmd = env + "mpirun --oversubscribe -np 4 " + BinDir() + "/memento-train-example " + args +
                            " --quiet --hidden 32 --layers 2 > " + out + " 2>&1";
    const int rc = std::system(cmd.c_str());
    std::ifstream f(out);
    std::stringstream ss;
    ss << "\n" << f.rdbuf();
    return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, ss.str()};
  }
};

TEST_F(ReshardResumeTest, Zero1CheckpointResumesAsZero3AndBackWithTheSameState) {
  const std::string job = UniqueJob("reshard");
  // References without memento: the ZeRO stage does not change the arithmetic.
  auto ref14 = Train(job, "", "--no-memento --steps 14 --tp 2 --dp 2 --zero 1");
  auto ref14_z3 = Train(job, "", "--no-memento --steps 14 --tp 2 --dp 2 --zero 3");
  auto ref16 = Train(job, "", "--no-memento --steps 16 --tp 2 --dp 2 --zero 1");
  for (const auto* r : {&ref14, &ref14_z3, &ref16}) ASSERT_EQ(r->first, 0) << r->second;
  EXPECT_EQ(Hash(ref14_z3.second, "global_state_hash"), Hash(ref14.second, "global_state_hash"));
  EXPECT_NE(Hash(ref14_z3.second, "state_hash"), Hash(ref14.second, "state_hash"));  // per-rank buffers differ

  const std::string store = TestTmp() + "/" + job + "-store";
  AgentCluster cluster(job, 2, {"--storage", store, "--flush-every", "4"});
  cluster.Start();
  auto first = Train(job, cluster.SocketPattern(), "--steps 10 --tp 2 --dp 2 --zero 1");
  ASSERT_EQ(first.first, 0) << first.second;
  auto wait_committed = [&](int64_t step) {
    for (int i = 0; i < 3000 && !fs::exists(CheckpointDir(store, job, step) + "/manifest"); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return fs::exists(CheckpointDir(store, job, step) + "/manifest");
  };
  ASSERT_TRUE(wait_committed(8)) << cluster.Log();

  // The saved (zero 1) checkpoint consolidates; its values are what every layout restores.
  const std::string ucp = TestTmp() + "/" + job + "-ucp8";
  Result<ConvertSummary> converted = ConvertNativeToUniversal(PosixFileSystem(), CheckpointDir(store, job, 8), ucp);
  ASSERT_TRUE(converted.ok()) << converted.status().ToString();
  EXPECT_EQ(converted->params, 2 * 4 + 2);
  EXPECT_EQ(converted->tensors, 3 * (2 * 4 + 2));

  // Restart as ZeRO-3 with no agent state: the agents load step 8 from storage onto the new shards.
  cluster.Kill();
  cluster.WipeNode(0);
  cluster.WipeNode(1);
  cluster.Start();
  auto z3 = Train(job, cluster.SocketPattern(), "--steps 14 --tp 2 --dp 2 --zero 3 --restore latest");
  ASSERT_EQ(z3.first, 0) << z3.second << cluster.Log();
  EXPECT_NE(z3.second.find("restored step=8"), std::string::npos) << z3.second;
  EXPECT_TRUE(cluster.LogHas("step 8 loaded from")) << cluster.Log();
  EXPECT_EQ(Hash(z3.second, "global_state_hash"), Hash(ref14.second, "global_state_hash"));
  EXPECT_EQ(Hash(z3.second, "state_hash"), Hash(ref14_z3.second, "state_hash"));
  ASSERT_TRUE(wait_committed(12)) << cluster.Log();

  // And back to ZeRO-1 from the ZeRO-3 checkpoint: the per-rank state is bitwise the reference's.
  cluster.Kill();
  cluster.WipeNode(0);
  cluster.WipeNode(1);
  cluster.Start();
  auto back = Train(job, cluster.SocketPattern(), "--steps 16 --tp 2 --dp 2 --zero 1 --restore latest");
  ASSERT_EQ(back.first, 0) << back.second << cluster.Log();
  EXPECT_NE(back.second.find("restored step=12"), std::string::npos) << back.second;
  EXPECT_EQ(Hash(back.second, "state_hash"), Hash(ref16.second, "state_hash"));
  EXPECT_EQ(Hash(back.second, "global_state_hash"), Hash(ref16.second, "global_state_hash"));
}

// Agents that still hold versions of the old layout only in memory: a job restarted with another
// layout is refused with a message that says which versions and why (nothing saved is dropped);
// the saved layout then restores the newest of them.
TEST_F(ReshardResumeTest, NewLayoutIsRefusedWhileOnlyMemoryHoldsNewerVersions) {
  const std::string job = UniqueJob("reshardlive");
  auto ref12 = Train(job, "", "--no-memento --steps 12 --tp 2 --dp 2 --zero 1");
  ASSERT_EQ(ref12.first, 0) << ref12.second;
  const std::string store = TestTmp() + "/" + job + "-store";
  AgentCluster cluster(job, 2, {"--storage", store, "--flush-every", "4"});
  cluster.Start();
  // Steps 9 and 10 stay in memory only (flush every 4).
  auto first = Train(job, cluster.SocketPattern(), "--steps 10 --tp 2 --dp 2 --zero 1");
  ASSERT_EQ(first.first, 0) << first.second;
  for (int i = 0; i < 3000 && !fs::exists(CheckpointDir(store, job, 8) + "/manifest"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(fs::exists(CheckpointDir(store, job, 8) + "/manifest")) << cluster.Log();
  auto z3 = Train(job, cluster.SocketPattern(), "--steps 12 --tp 2 --dp 2 --zero 3 --restore latest");
  EXPECT_NE(z3.first, 0) << z3.second;
  EXPECT_NE(z3.second.find("registration differs from the saved layout"), std::string::npos) << z3.second;
  EXPECT_NE(z3.second.find("versions 9, 10 of the saved layout are only in this node's memory (newest in storage: 8)"),
            std::string::npos)
      << z3.second;
  // Nothing was dropped: the saved layout restores step 10 from memory and reaches the reference.
  auto again = Train(job, cluster.SocketPattern(), "--steps 12 --tp 2 --dp 2 --zero 1 --restore latest");
  ASSERT_EQ(again.first, 0) << again.second << cluster.Log();
  EXPECT_NE(again.second.find("restored step=10"), std::string::npos) << again.second;
  EXPECT_EQ(Hash(again.second, "state_hash"), Hash(ref12.second, "state_hash"));
}

// A new job resumes from a universal checkpoint of another job, in another layout: the agents
// load it (--restore-from) when neither memory nor their storage holds anything newer.
TEST_F(ReshardResumeTest, NewJobResumesFromUniversalCheckpoint) {
  const std::string job = UniqueJob("fromucp");
  auto ref14 = Train(job, "", "--no-memento --steps 14 --tp 2 --dp 2 --zero 1");
  ASSERT_EQ(ref14.first, 0) << ref14.second;
  const std::string store = TestTmp() + "/" + job + "-store";
  std::string ucp;
  {
    AgentCluster cluster(job, 2, {"--storage", store, "--flush-every", "4"});
    cluster.Start();
    auto first = Train(job, cluster.SocketPattern(), "--steps 8 --tp 2 --dp 2 --zero 1");
    ASSERT_EQ(first.first, 0) << first.second;
    for (int i = 0; i < 3000 && !fs::exists(CheckpointDir(store, job, 8) + "/manifest"); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ASSERT_TRUE(fs::exists(CheckpointDir(store, job, 8) + "/manifest")) << cluster.Log();
    ucp = TestTmp() + "/" + job + "-ucp";
    ASSERT_TRUE(ConvertNativeToUniversal(PosixFileSystem(), CheckpointDir(store, job, 8), ucp).ok());
  }
  const std::string job2 = UniqueJob("fromucp2");
  AgentCluster cluster2(job2, 2, {"--storage", TestTmp() + "/" + job2 + "-store", "--restore-from", ucp});
  cluster2.Start();
  auto z3 = Train(job2, cluster2.SocketPattern(), "--steps 14 --tp 2 --dp 2 --zero 3 --restore latest");
  ASSERT_EQ(z3.first, 0) << z3.second << cluster2.Log();
  EXPECT_NE(z3.second.find("restored step=8"), std::string::npos) << z3.second;
  EXPECT_TRUE(cluster2.LogHas("step 8 loaded from " + ucp)) << cluster2.Log();
  EXPECT_EQ(Hash(z3.second, "global_state_hash"), Hash(ref14.second, "global_state_hash"));
}

TEST_F(ReshardResumeTest, RestoreFromNeedsACheckpointAndStorage) {
  auto run = [](const std::string& args) {
    const std::string cmd = "mpirun --oversubscribe -np 1 " + BinDir() + "/memento-agent --job rf --socket " + TestTmp() +
                            "/rf-%n.sock --catalog " + TestTmp() + "/rf-cat-%n " + args + " 2>&1";
    std::string out;
    FILE* p = ::popen(cmd.c_str(), "r");
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    const int st = ::pclose(p);
    return std::make_pair(WIFEXITED(st) ? WEXITSTATUS(st) : -1, out);
  };
  const std::string not_a_checkpoint = TestTmp() + "/not-a-checkpoint";
  fs::create_directories(not_a_checkpoint);
  auto bad = run("--storage " + TestTmp() + "/rf-store --restore-from " + not_a_checkpoint);
  EXPECT_NE(bad.first, 0) << bad.second;
  EXPECT_NE(bad.second.find("--restore-from " + not_a_checkpoint + " is neither a universal checkpoint"),
            std::string::npos)
      << bad.second;
  auto no_storage = run("--restore-from " + not_a_checkpoint);
  EXPECT_NE(no_storage.first, 0) << no_storage.second;
  EXPECT_NE(no_storage.second.find("--restore-from " + not_a_checkpoint +
                                   " needs --storage (where the resumed job's checkpoints go)"),
            std::string::npos)
      << no_storage.second;
}

}  // namespace
}  // namespace memento::testing
