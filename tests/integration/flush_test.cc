// Flush to storage with real agents and a fault-injecting file system: ENOSPC mid-flush, the agent
// SIGKILLed mid-flush, EIO on read, a flipped byte in a data file, retention, and restore from
// storage after a node loss. Each test proves its fault happened (error text, agent log, files).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/file_system.h"
#include "integration/harness.h"
#include "ucp_format/native_checkpoint.h"

namespace memento::testing {
namespace {

namespace fs = std::filesystem;
constexpr int kRanks = 2;
constexpr int kTensors = 2;
constexpr size_t kElems = 1 << 16;  // 256 KiB per tensor

class FlushTest : public ::testing::Test {
 protected:
  void SetUp() override { job_ = UniqueJob("fl"); }  // short: socket paths are limited to 107 bytes
  std::string Store() const { return TestTmp() + "/" + job_ + "/store"; }
  std::string StepDir(int64_t step) const { return CheckpointDir(Store(), job_, step); }
  void StartAgents(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--storage", Store(), "--flush-retry", "0.2"};
    args.insert(args.end(), extra.begin(), extra.end());
    if (!cluster_) cluster_ = std::make_unique<AgentCluster>(job_, 1, args);
    cluster_->SetExtraArgs(args);
    cluster_->Start();
  }
  // Ranks in threads: connect, register, and run `fn(rank, client, state)`.
  void WithRanks(const std::function<void(int, Client*, RankState*)>& fn) {
    RunRanks(kRanks, [&](int rank) {
      auto c = cluster_->Connect(rank, kRanks, 0, rank);
      ASSERT_TRUE(c.ok()) << c.status().ToString();
      RankState s(kTensors, kElems, kRanks, rank);
      ASSERT_TRUE(s.Register(c->get()).ok());
      ASSERT_TRUE((*c)->FinishRegistration().ok());
      fn(rank, c->get(), &s);
    });
  }
  static void Capture(int rank, Client* c, RankState* s, int64_t step) {
    s->Fill(rank, step);
    ASSERT_TRUE(c->Snapshot(step).ok());
    ASSERT_TRUE(c->WaitUntilSafeToUpdate().ok());
  }
  // After a node loss: a fresh start of the agents, every rank restores `expect` bit-exact.
  RestoreResult RestoreAfterNodeLoss(int64_t expect, std::vector<std::string> extra = {}) {
    cluster_->Kill();
    cluster_->WipeNode(0);
    StartAgents(extra);
    RestoreResult out;
    RunRanks(kRanks, [&](int rank) {
      auto c = cluster_->Connect(rank, kRanks, 0, rank);
      ASSERT_TRUE(c.ok()) << c.status().ToString();
      RankState s(kTensors, kElems, kRanks, rank);
      ASSERT_TRUE(s.Register(c->get()).ok());
      auto r = (*c)->Restore();
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      EXPECT_EQ(r->step, expect);
      EXPECT_TRUE(s.Matches(rank, expect)) << "rank " << rank;
      if (rank == 0) out = *r;
    });
    return out;
  }

  std::string job_;
  std::unique_ptr<AgentCluster> cluster_;
};

TEST_F(FlushTest, EnospcMidFlushIsReportedKeepsMemoryAndIsRetriedOnceSpaceReturns) {
  const std::string full = TestTmp() + "/disk-full-" + job_;
  StartAgents({"--inject-fs", "enospc_while=" + full});
  WithRanks([&](int rank, Client* c, RankState* s) {
    Capture(rank, c, s, 1);
    ASSERT_TRUE(WaitPersisted(c, 1));
  });
  std::ofstream(full) << "the disk is full\n";
  WithRanks([&](int rank, Client* c, RankState* s) {
    Capture(rank, c, s, 2);
    if (rank == 0) {
      const std::string err = WaitFlushError(c, 2);
      EXPECT_NE(err.find("No space left on device"), std::string::npos) << err;
      EXPECT_NE(err.find(StepDir(2)), std::string::npos) << err;
      // The earlier checkpoint is intact, and nothing of step 2 is committed.
      auto problems = VerifyCheckpoint(PosixFileSystem(), StepDir(1));
      ASSERT_TRUE(problems.ok()) << problems.status().ToString();
      EXPECT_TRUE(problems->empty());
      EXPECT_EQ(ReadManifest(PosixFileSystem(), StepDir(2)).status().code(), StatusCode::kNotFound);
    }
  });
  EXPECT_TRUE(cluster_->LogHas("flush of step 2 failed on node 0; the version stays in memory; retrying in"))
      << cluster_->Log();
  fs::remove(full);  // space returns
  WithRanks([&](int rank, Client* c, RankState* s) {
    if (rank == 0) {
      EXPECT_TRUE(WaitPersisted(c, 2));
    }
    // The in-memory copy was kept all along.
    s->Clear();
    auto r = c->Restore();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->step, 2);
    EXPECT_TRUE(s->Matches(rank, 2));
  });
  auto problems = VerifyCheckpoint(PosixFileSystem(), StepDir(2));
  ASSERT_TRUE(problems.ok());
  EXPECT_TRUE(problems->empty());
}

TEST_F(FlushTest, AgentKilledMidFlushLeavesNoManifestAndRestartCleansUp) {
  StartAgents();
  WithRanks([&](int rank, Client* c, RankState* s) {
    Capture(rank, c, s, 1);
    ASSERT_TRUE(WaitPersisted(c, 1));
  });
  cluster_->Stop();
  ::setenv("MEMENTO_KILL_POINT", "agent.flush_mid_write:step=2", 1);
  StartAgents();
  ::unsetenv("MEMENTO_KILL_POINT");
  RunRanks(kRanks, [&](int rank) {
    auto c = cluster_->Connect(rank, kRanks, 0, rank);
    ASSERT_TRUE(c.ok());
    RankState s(kTensors, kElems, kRanks, rank);
    ASSERT_TRUE(s.Register(c->get()).ok());
    ASSERT_TRUE((*c)->Restore().ok());
    s.Fill(rank, 2);
    ASSERT_TRUE((*c)->Snapshot(2).ok());
    (void)(*c)->WaitUntilSafeToUpdate();
  });
  // The agent dies after writing rank 0's files of step 2: a partial directory, no manifest.
  ASSERT_TRUE(cluster_->WaitExit(30000)) << "the kill point did not fire mid-flush";
  ASSERT_TRUE(fs::exists(StepDir(2) + "/rank-0.data"));
  EXPECT_FALSE(fs::exists(StepDir(2) + "/manifest"));
  EXPECT_FALSE(fs::exists(StepDir(2) + "/rank-1.meta"));
  RestoreResult r = RestoreAfterNodeLoss(1);
  EXPECT_EQ(r.source, StepDir(1));
  EXPECT_FALSE(fs::exists(StepDir(2))) << "the partial checkpoint must be removed at start";
  EXPECT_TRUE(cluster_->LogHas("removing partial checkpoint " + StepDir(2) + " (no manifest: never committed)"))
      << cluster_->Log();
}

TEST_F(FlushTest, EioOnReadIsAClearErrorAndThePreviousCheckpointIsUsed) {
  StartAgents();
  WithRanks([&](int rank, Client* c, RankState* s) {
    for (int64_t step = 1; step <= 2; ++step) {
      Capture(rank, c, s, step);
      ASSERT_TRUE(WaitPersisted(c, step));
    }
  });
  RestoreResult r = RestoreAfterNodeLoss(1, {"--inject-fs", "eio_read=step-2/rank-0.data"});
  ASSERT_EQ(r.refused.size(), 1u);
  EXPECT_NE(r.refused[0].find("checkpoint " + StepDir(2) + " refused: "), std::string::npos) << r.refused[0];
  EXPECT_NE(r.refused[0].find("read(" + StepDir(2) + "/rank-0.data): Input/output error"), std::string::npos)
      << r.refused[0];
  EXPECT_EQ(r.source, StepDir(1));
}

TEST_F(FlushTest, FlippedByteInADataFileFallsBackToThePreviousCheckpoint) {
  StartAgents();
  WithRanks([&](int rank, Client* c, RankState* s) {
    for (int64_t step = 1; step <= 2; ++step) {
      Capture(rank, c, s, step);
      ASSERT_TRUE(WaitPersisted(c, step));
    }
  });
  {
    std::fstream f(StepDir(2) + "/rank-1.data", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(1000);
    char b = 0;
    f.read(&b, 1);
    b ^= 0x40;
    f.seekp(1000);
    f.write(&b, 1);
  }
  auto problems = VerifyCheckpoint(PosixFileSystem(), StepDir(2));
  ASSERT_TRUE(problems.ok());
  ASSERT_EQ(problems->size(), 1u);
  EXPECT_EQ((*problems)[0].tensor, "t0");
  RestoreResult r = RestoreAfterNodeLoss(1);
  ASSERT_EQ(r.refused.size(), 1u) << cluster_->Log();
  EXPECT_NE(r.refused[0].find("CRC mismatch"), std::string::npos) << r.refused[0];
  EXPECT_NE(r.refused[0].find(StepDir(2) + "/rank-1.data"), std::string::npos) << r.refused[0];
  EXPECT_NE(r.refused[0].find("'t0'"), std::string::npos) << r.refused[0];
}

TEST_F(FlushTest, RetentionRemovesOnlyOlderCommittedCheckpoints) {
  StartAgents({"--keep", "2"});
  // A newer directory that is not a committed checkpoint of this run must survive retention.
  fs::create_directories(StepDir(100));
  std::ofstream(StepDir(100) + "/rank-0.data") << "partial";
  WithRanks([&](int rank, Client* c, RankState* s) {
    for (int64_t step = 1; step <= 4; ++step) {
      Capture(rank, c, s, step);
      ASSERT_TRUE(WaitPersisted(c, step));
    }
  });
  auto list = ListCheckpoints(PosixFileSystem(), JobDir(Store(), job_));
  ASSERT_TRUE(list.ok());
  std::vector<std::pair<int64_t, bool>> got;
  for (const auto& c : *list) got.push_back({c.step, c.committed});
  EXPECT_EQ(got, (std::vector<std::pair<int64_t, bool>>{{3, true}, {4, true}, {100, false}}));
}

// memento-train-example restarted with no agent state at all restores from storage.
TEST(FlushTrainerTest, TrainerRestartedWithNoAgentStateRestoresFromStorageToTheSameHash) {
  const std::string job = UniqueJob("trainerstore");
  AgentCluster cluster(job, 2, {"--storage", TestTmp() + "/" + job + "-store", "--flush-every", "4"});
  cluster.Start();
  auto run = [&](const std::string& args) {
    std::string out = TestTmp() + "/" + job + ".out";
    std::string cmd = "MEMENTO_JOB_ID=" + job + " MEMENTO_AGENT_SOCKET=" + cluster.SocketPattern() +
                      " MEMENTO_RANKS_PER_NODE=2 mpirun --oversubscribe -np 4 " + BinDir() + "/memento-train-example " +
                      args + " --quiet > " + out + " 2>&1";
    int rc = std::system(cmd.c_str());
    std::ifstream f(out);
    std::stringstream ss;
    ss << f.rdbuf();
    return std::make_pair(WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, ss.str());
  };
  auto ref = run("--no-memento --steps 14");
  ASSERT_EQ(ref.first, 0) << ref.second;
  auto first = run("--steps 10");
  ASSERT_EQ(first.first, 0) << first.second;
  WaitUntil([&] { return fs::exists(CheckpointDir(TestTmp() + "/" + job + "-store", job, 8) + "/manifest"); }, 30000);
  cluster.Kill();
  cluster.WipeNode(0);
  cluster.WipeNode(1);
  cluster.Start();
  auto resumed = run("--steps 14 --restore latest");
  ASSERT_EQ(resumed.first, 0) << resumed.second;
  EXPECT_NE(resumed.second.find("restored step=8"), std::string::npos) << resumed.second;
  auto hash = [](const std::string& s) { auto p = s.find("state_hash="); return p == std::string::npos ? "" : s.substr(p, 27); };
  EXPECT_EQ(hash(resumed.second), hash(ref.second));
  EXPECT_TRUE(cluster.LogHas("step 8 loaded from")) << cluster.Log();
}

}  // namespace
}  // namespace memento::testing
