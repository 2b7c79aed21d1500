// Fault injection with real processes: training ranks SIGKILLed during capture, between capture
// and commit, and after commit; the agents SIGKILLed and restarted; a byte flipped in a slot;
// 4 ranks on 2 simulated nodes. Each test proves its fault happened (exit signal, agent log).
#include <sys/stat.h>

#include <cstdlib>
#include <fstream>

#include <gtest/gtest.h>

#include "core/shared_memory.h"
#include "integration/harness.h"

namespace memento::testing {
namespace {

constexpr int kTensors = 3;
constexpr size_t kElems = 1 << 18;  // 1 MiB per tensor

// A rank in a child process: captures steps 1..last, then (with a kill point set in the
// environment) dies at `last`. Returns 0 when every step was captured and waited for.
int CaptureSteps(const AgentCluster& cluster, int rank, int world, int64_t last, bool wait_global_last) {
  auto c = cluster.Connect(rank, world, 0, rank);
  if (!c.ok()) return 10;
  RankState s(kTensors, kElems);
  if (!s.Register(c->get()).ok()) return 11;
  if (!(*c)->FinishRegistration().ok()) return 12;
  for (int64_t step = 1; step <= last; ++step) {
    s.Fill(rank, step);
    if (!(*c)->Snapshot(step).ok()) return 13;
    if (!(*c)->WaitUntilSafeToUpdate().ok()) return 14;
  }
  if (wait_global_last) {
    if (!WaitGloballyComplete(c->get(), last)) return 15;
    ::raise(SIGKILL);  // after commit
  }
  return 0;
}

// Restarts `world` ranks (threads) and checks every one restores `expect` bit-exact.
void ExpectRestore(const AgentCluster& cluster, int world, int64_t expect, std::vector<std::string>* refused = nullptr) {
  RunRanks(world, [&](int rank) {
    auto c = cluster.Connect(rank, world, 0, rank);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    RankState s(kTensors, kElems);
    ASSERT_TRUE(s.Register(c->get()).ok());
    auto r = (*c)->Restore();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->step, expect) << "rank " << rank;
    EXPECT_TRUE(s.Matches(rank, expect)) << "rank " << rank << " bytes differ from step " << expect;
    if (refused && rank == 0) *refused = r->refused;
  });
}

TEST(FaultTest, RankKilledDuringCaptureRestoresPreviousVersion) {
  AgentCluster cluster(UniqueJob("duringcopy"), 1);
  cluster.Start();
  ::setenv("MEMENTO_KILL_POINT", "client.during_copy:rank=1:step=3", 1);
  int status[2];
  RunRanks(2, [&](int rank) { status[rank] = RunInChild([&] { return CaptureSteps(cluster, rank, 2, 3, false); }); });
  ::unsetenv("MEMENTO_KILL_POINT");
  EXPECT_TRUE(WIFEXITED(status[0]) && WEXITSTATUS(status[0]) == 0);
  ASSERT_TRUE(WIFSIGNALED(status[1]) && WTERMSIG(status[1]) == SIGKILL) << "the kill point did not fire";
  ExpectRestore(cluster, 2, 2);
  EXPECT_TRUE(cluster.LogHas("dropping torn version 3")) << cluster.Log();
}

TEST(FaultTest, RankKilledBetweenCaptureAndCommitRestoresPreviousVersion) {
  AgentCluster cluster(UniqueJob("beforecommit"), 1);
  cluster.Start();
  ::setenv("MEMENTO_KILL_POINT", "client.before_captured:rank=0:step=3", 1);
  int status[2];
  RunRanks(2, [&](int rank) { status[rank] = RunInChild([&] { return CaptureSteps(cluster, rank, 2, 3, false); }); });
  ::unsetenv("MEMENTO_KILL_POINT");
  ASSERT_TRUE(WIFSIGNALED(status[0]) && WTERMSIG(status[0]) == SIGKILL) << "the kill point did not fire";
  EXPECT_TRUE(WIFEXITED(status[1]) && WEXITSTATUS(status[1]) == 0);
  ExpectRestore(cluster, 2, 2);
  EXPECT_TRUE(cluster.LogHas("dropping torn version 3")) << cluster.Log();
}

TEST(FaultTest, RankKilledAfterCommitRestoresThatVersion) {
  AgentCluster cluster(UniqueJob("aftercommit"), 1);
  cluster.Start();
  int status[2];
  RunRanks(2, [&](int rank) { status[rank] = RunInChild([&] { return CaptureSteps(cluster, rank, 2, 3, true); }); });
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(WIFSIGNALED(status[r]) && WTERMSIG(status[r]) == SIGKILL) << "rank " << r;
  ExpectRestore(cluster, 2, 3);
}

TEST(FaultTest, AgentKilledAndRestartedServesBitExactRestores) {
  AgentCluster cluster(UniqueJob("agentkill"), 1);
  cluster.Start();
  int status[2];
  RunRanks(2, [&](int rank) { status[rank] = RunInChild([&] { return CaptureSteps(cluster, rank, 2, 2, true); }); });
  cluster.Kill();
  EXPECT_FALSE(SharedMemory::Exists(cluster.SlotName(0, 0, 9)));
  EXPECT_TRUE(SharedMemory::Exists(cluster.SlotName(0, 0, 0))) << "slots must survive the agent";
  cluster.Start();
  ExpectRestore(cluster, 2, 2);
  EXPECT_TRUE(cluster.LogHas("2 ranks, 2 complete versions re-attached")) << cluster.Log();
}

// The agent acknowledges a capture before its CRCs are computed. It records the acknowledgement
// first, so an agent that dies while checksumming (here: in rank 1's CRC task of step 3, once)
// completes the CRCs from the slot on restart instead of dropping a version its ranks were told
// was captured.
TEST(FaultTest, AgentKilledWhileChecksummingAnAcknowledgedCaptureKeepsIt) {
  AgentCluster cluster(UniqueJob("crckill"), 1);
  const std::string marker = cluster.Dir() + "/crc-killed";
  ::setenv("MEMENTO_KILL_POINT", ("agent.crc:rank=1:step=3:once=" + marker).c_str(), 1);
  cluster.Start();
  ::unsetenv("MEMENTO_KILL_POINT");
  {
    std::vector<std::unique_ptr<Client>> clients(2);
    std::vector<std::unique_ptr<RankState>> states(2);
    RunRanks(2, [&](int rank) {
      auto c = cluster.Connect(rank, 2, 0, rank);
      ASSERT_TRUE(c.ok()) << c.status().ToString();
      states[rank] = std::make_unique<RankState>(kTensors, kElems);
      ASSERT_TRUE(states[rank]->Register(c->get()).ok());
      ASSERT_TRUE((*c)->FinishRegistration().ok());
      for (int64_t step = 1; step <= 2; ++step) {
        states[rank]->Fill(rank, step);
        ASSERT_TRUE((*c)->Snapshot(step).ok());
        ASSERT_TRUE((*c)->WaitUntilSafeToUpdate().ok());
      }
      clients[rank] = std::move(c).value();
    });
    ASSERT_TRUE(WaitGloballyComplete(clients[0].get(), 2));
    // Rank 0 captures step 3 and its CRCs are recorded; then rank 1 captures it and the agent dies
    // computing rank 1's CRCs, after recording the acknowledgement.
    states[0]->Fill(0, 3);
    ASSERT_TRUE(clients[0]->Snapshot(3).ok());
    ASSERT_TRUE(clients[0]->WaitUntilSafeToUpdate().ok());
    ASSERT_TRUE(WaitUntil([&] { return VersionShows(clients[0].get(), 3, [](const VersionInfo& x) { return x.captured_ranks == 1; }); },
                          30000))
        << "rank 0's capture of step 3 was never checksummed";
    states[1]->Fill(1, 3);
    ASSERT_TRUE(clients[1]->Snapshot(3).ok());
    ASSERT_TRUE(clients[1]->WaitUntilSafeToUpdate().ok());
    ASSERT_TRUE(cluster.WaitExit(30000)) << "the agent did not die at agent.crc:\n" << cluster.Log();
    struct stat st {};
    ASSERT_EQ(::stat(marker.c_str(), &st), 0) << "the kill point agent.crc did not fire";
  }
  cluster.Start();
  ExpectRestore(cluster, 2, 3);
  EXPECT_TRUE(cluster.LogHas("version 3: every local rank's capture was acknowledged before the agent stopped; "
                             "its CRCs were completed from the slots"))
      << cluster.Log();
}

TEST(FaultTest, FlippedByteIsDetectedAndThePreviousVersionRestored) {
  AgentCluster cluster(UniqueJob("bitflip"), 1);
  cluster.Start();
  int status[2];
  RunRanks(2, [&](int rank) { status[rank] = RunInChild([&] { return CaptureSteps(cluster, rank, 2, 2, true); }); });
  // Steps 1 and 2 went to slots 0 and 1. Flip one byte of rank 1's tensor t1 in step 2's slot.
  {
    const size_t slot_bytes = 3 * (kElems * 4) + 4096;  // three 4 KiB-aligned tensors and the blob
    auto seg = SharedMemory::Open(cluster.SlotName(0, 1, 1), slot_bytes, /*writable=*/true);
    ASSERT_TRUE(seg.ok()) << seg.status().ToString();
    (*seg)->data()[kElems * 4 + 12345] ^= 0x10;
  }
  std::vector<std::string> refused;
  ExpectRestore(cluster, 2, 1, &refused);
  ASSERT_EQ(refused.size(), 1u);
  EXPECT_EQ(refused[0].substr(0, 92),
            "version 2 refused: CRC mismatch in rank 1 tensor 't1' step 2 (bytes 0..1048576 of the tensor");
}

TEST(FaultTest, FourRanksOnTwoNodesRestorableOnlyOnceEveryRankCaptured) {
  AgentCluster cluster(UniqueJob("fournodes"), 2);
  cluster.Start();
  std::vector<std::unique_ptr<Client>> clients(4);
  std::vector<std::unique_ptr<RankState>> states(4);
  RunRanks(4, [&](int rank) {
    auto c = cluster.Connect(rank, 4, rank / 2, rank % 2);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    states[rank] = std::make_unique<RankState>(2, 4096);
    ASSERT_TRUE(states[rank]->Register(c->get()).ok());
    ASSERT_TRUE((*c)->FinishRegistration().ok());
    states[rank]->Fill(rank, 1);
    ASSERT_TRUE((*c)->Snapshot(1).ok());
    ASSERT_TRUE((*c)->WaitUntilSafeToUpdate().ok());
    clients[rank] = std::move(c).value();
  });
  ASSERT_TRUE(WaitGloballyComplete(clients[0].get(), 1));
  // Ranks 0, 1, 2 capture step 2; rank 3 (node 1) has not yet.
  for (int rank = 0; rank < 3; ++rank) {
    states[rank]->Fill(rank, 2);
    ASSERT_TRUE(clients[rank]->Snapshot(2).ok());
    ASSERT_TRUE(clients[rank]->WaitUntilSafeToUpdate().ok());
  }
  // Node 0 completes step 2 locally (its agent checksums the captures); node 1 cannot.
  ASSERT_TRUE(WaitUntil([&] { return VersionShows(clients[0].get(), 2, [](const VersionInfo& x) { return x.state == "locally_complete"; }); },
                        30000));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // many agreement rounds: still not global
  auto v0 = clients[0]->ListVersions();
  auto v1 = clients[3]->ListVersions();
  ASSERT_TRUE(v0.ok() && v1.ok());
  ASSERT_EQ(v0->size(), 2u);
  EXPECT_EQ((*v0)[1].step, 2);
  EXPECT_EQ((*v0)[1].state, "locally_complete");  // node 0 has all its ranks, node 1 does not
  EXPECT_EQ((*v1)[1].state, "capturing");
  EXPECT_EQ((*v1)[1].captured_ranks, 1);
  auto early = clients[0]->Restore(2);
  EXPECT_EQ(early.status().code(), StatusCode::kNotFound);
  auto latest = clients[1]->Restore();
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->step, 1);
  EXPECT_TRUE(states[1]->Matches(1, 1));
  states[1]->Fill(1, 2);  // back to step 2's state for rank 1
  // Rank 3 captures: step 2 becomes globally complete on both nodes.
  states[3]->Fill(3, 2);
  ASSERT_TRUE(clients[3]->Snapshot(2).ok());
  ASSERT_TRUE(clients[3]->WaitUntilSafeToUpdate().ok());
  ASSERT_TRUE(WaitGloballyComplete(clients[0].get(), 2));
  ASSERT_TRUE(WaitGloballyComplete(clients[3].get(), 2));
  for (int rank = 0; rank < 4; ++rank) {
    states[rank]->Clear();
    auto r = clients[rank]->Restore();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->step, 2);
    EXPECT_TRUE(states[rank]->Matches(rank, 2)) << "rank " << rank;
  }
}

// The trainer example end to end: crash at a step, restart with --restore latest, and reach the
// same state_hash as a run that never failed.
std::string RunTrainer(const AgentCluster* cluster, const std::string& args, int* exit_code) {
  std::string out = TestTmp() + "/trainer.out";
  std::string env = cluster ? "MEMENTO_JOB_ID=" + cluster->job() + " MEMENTO_AGENT_SOCKET=" + cluster->SocketPattern() +
                                  " MEMENTO_RANKS_PER_NODE=2 "
                            : "";
  std::string cmd = env + "mpirun --oversubscribe -np 4 " + BinDir() + "/memento-train-example " +
                    args + " --quiet > " + out + " 2>&1";
  int rc = std::system(cmd.c_str());
  *exit_code = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  std::ifstream f(out);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string HashOf(const std::string& out) {
  auto p = out.find("state_hash=");
  return p == std::string::npos ? "" : out.substr(p, 27);
}

TEST(FaultTest, TrainerCrashedMidRunResumesToTheSameStateHash) {
  AgentCluster cluster(UniqueJob("trainer"), 2);
  cluster.Start();
  int rc = 0;
  const std::string reference = HashOf(RunTrainer(nullptr, "--no-memento --steps 12", &rc));
  ASSERT_EQ(rc, 0);
  ASSERT_FALSE(reference.empty());
  std::string crashed = RunTrainer(&cluster, "--steps 12 --crash-at-step 7 --crash-rank 2", &rc);
  EXPECT_NE(rc, 0) << crashed;
  EXPECT_TRUE(HashOf(crashed).empty()) << "the crashed run must not finish";
  std::string resumed = RunTrainer(&cluster, "--steps 12 --restore latest", &rc);
  ASSERT_EQ(rc, 0) << resumed;
  // Rank 2 died after Snapshot(7) returned: its copy of step 7 may or may not have landed and been
  // reported before the SIGKILL, so the newest complete version is 7 or 6 — never a torn one.
  EXPECT_TRUE(resumed.find("restored step=6") != std::string::npos ||
              resumed.find("restored step=7") != std::string::npos)
      << resumed;
  EXPECT_EQ(HashOf(resumed), reference) << resumed;
}

}  // namespace
}  // namespace memento::testing
