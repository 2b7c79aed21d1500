// memento-run end to end: memento-train-example on 4 simulated nodes x 2 ranks, with every drill
// alone and several together. Each run must end with the state_hash of a run that never failed,
// and the timeline must show the failure that was injected (so the fault provably happened).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "integration/harness.h"
#include "proto/version.h"

namespace memento::testing {
namespace {

constexpr int kSteps = 24;

// MEMENTO_TEST_TIME_SCALE (scripts/test-sanitizers sets it): a sanitizer slows every process, so
// a rank that is only slow would fall silent for a whole 2-s hang timeout. The hang tests scale
// their timeout, and the bounds on the detection, by it.
double TimeScale() {
  const char* v = std::getenv("MEMENTO_TEST_TIME_SCALE");
  const double s = v != nullptr ? std::atof(v) : 1.0;
  return s >= 1.0 ? s : 1.0;
}
double HangTimeout() { return 2.0 * TimeScale(); }
std::string HangTimeoutFlag() {
  char buf[64];
  std::snprintf(buf, sizeof buf, "--hang-timeout %g", HangTimeout());
  return buf;
}


// The last "state_hash=..." line (the one at a line start; not global_state_hash=).
std::string LastStateHash(const std::string& out) {
  size_t p = out.rfind("\nstate_hash=");
  if (p == std::string::npos) return out.rfind("state_hash=", 0) == 0 ? out.substr(0, out.find('\n')) : "";
  ++p;
  return out.substr(p, out.find('\n', p) - p);
}

struct LaunchResult {
  int exit_code = -1;
  std::string output;    // stdout and stderr
  std::string timeline;  // the JSON file
  std::string work_dir;
  std::string StateHash() const { return LastStateHash(output); }
};

std::string Run(const std::string& cmd, int* exit_code) {
  std::string out;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int st = ::pclose(p);
  *exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

std::string TrainCommand() {
  return BinDir() + "/memento-train-example --steps " + std::to_string(kSteps) + " --step-ms 60 --quiet";
}

// The state_hash of the same training with no failure and no memento.
const std::string& Reference() {
  static const std::string ref = [] {
    int rc = 0;
    std::string out = Run("mpirun --oversubscribe -np 8 " + BinDir() + "/memento-train-example --no-memento --steps " +
                              std::to_string(kSteps) + " --quiet",
                          &rc);
    EXPECT_EQ(rc, 0) << out;
    const std::string hash = LastStateHash(out);
    return hash.empty() ? std::string("none") : hash;
  }();
  return ref;
}

// The work directories of the current test's runs: their agents' logs are printed if it fails.
std::vector<std::string>& LaunchedDirs() {
  static std::vector<std::string> dirs;
  return dirs;
}

class PrintAgentLogsOnFailure : public ::testing::EmptyTestEventListener {
  void OnTestStart(const ::testing::TestInfo&) override { LaunchedDirs().clear(); }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      for (const std::string& dir : LaunchedDirs()) {
        std::ifstream f(dir + "/agents.log");
        std::stringstream ss;
        ss << f.rdbuf();
        std::printf("==== %s/agents.log\n%s\n", dir.c_str(), ss.str().c_str());
      }
    }
    LaunchedDirs().clear();
  }
};

[[maybe_unused]] const bool kListenerAdded = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(new PrintAgentLogsOnFailure);
  return true;
}();

// `env`: NAME=VALUE words put before memento-run (its agents and ranks inherit them).
LaunchResult Launch(const std::string& name, const std::string& args, const std::string& env = "") {
  LaunchResult r;
  const std::string job = UniqueJob(name);
  r.work_dir = TestTmp() + "/" + job;
  LaunchedDirs().push_back(r.work_dir);
  r.output = Run((env.empty() ? "" : "env " + env + " ") + BinDir() + "/memento-run --simulate-nodes 4 --ranks-per-node 2 --job " + job + " --work-dir " +
                     r.work_dir + " --quiet " + args + " -- " + TrainCommand(),
                 &r.exit_code);
  std::ifstream f(r.work_dir + "/timeline.json");
  std::stringstream ss;
  ss << f.rdbuf();
  r.timeline = ss.str();
  return r;
}

// The objects of the timeline's "failures" array, as text.
std::vector<std::string> Failures(const std::string& json) {
  std::vector<std::string> out;
  for (size_t p = json.find("{\"attempt\""); p != std::string::npos; p = json.find("{\"attempt\"", p + 1)) {
    out.push_back(json.substr(p, json.find('}', p) - p + 1));
  }
  return out;
}

// The raw value text of "key" in a flat JSON object (arrays included).
std::string Field(const std::string& obj, const std::string& key) {
  size_t p = obj.find("\"" + key + "\":");
  if (p == std::string::npos) return "<missing>";
  p += key.size() + 3;
  size_t end = obj[p] == '[' ? obj.find(']', p) + 1 : obj[p] == '"' ? obj.find('"', p + 1) + 1 : obj.find_first_of(",}", p);
  return obj.substr(p, end - p);
}
double Number(const std::string& obj, const std::string& key) { return std::atof(Field(obj, key).c_str()); }

// What every recovered failure must show: a restore from memory of a step at most `last_step`,
// steps lost counted from it.
void ExpectRecoveredFromMemory(const std::string& f) {
  EXPECT_EQ(Field(f, "source"), "\"memory\"") << f;
  const double restored = Number(f, "restored_step");
  EXPECT_GE(restored, 1) << f;
  EXPECT_LE(restored, Number(f, "last_step")) << f;
  EXPECT_EQ(Number(f, "steps_lost"), Number(f, "last_step") - restored) << f;
  EXPECT_GE(Number(f, "agent_restart_s"), 0) << f;
  EXPECT_GE(Number(f, "resumed_after_s"), 0) << f;
}

TEST(LauncherE2E, NodeLossRebuiltFromParity) {
  LaunchResult r = Launch("nodeloss", "--ec rs:2 --spares 1 --inject node-loss:node=2:step=10");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.StateHash(), Reference()) << r.output;
  auto fs = Failures(r.timeline);
  ASSERT_EQ(fs.size(), 1u) << r.timeline;
  EXPECT_EQ(Field(fs[0], "kind"), "\"node-loss\"");
  EXPECT_EQ(Field(fs[0], "injected"), "true");
  EXPECT_EQ(Field(fs[0], "lost_nodes"), "[2]");
  EXPECT_EQ(Field(fs[0], "replacements"), "[4]");
  // Detected by the death of one of the node's ranks (or of its agent), not by a timeout.
  const std::string detail = Field(fs[0], "detail");
  EXPECT_TRUE(detail.find(") died") != std::string::npos || detail.find("job exited") != std::string::npos) << fs[0];
  EXPECT_GE(Number(fs[0], "last_step"), 10);
  ExpectRecoveredFromMemory(fs[0]);
  EXPECT_NE(r.timeline.find("\"restarts\":1,"), std::string::npos) << r.timeline;
  // The lost node's disk is gone; its replacement served (and was cleaned up at the end).
  struct stat st {};
  EXPECT_NE(::stat((r.work_dir + "/node-2").c_str(), &st), 0);
  EXPECT_NE(r.output.find("training finished (1 restart"), std::string::npos) << r.output;
}

TEST(LauncherE2E, RankCrash) {
  LaunchResult r = Launch("rankcrash", "--inject rank-crash:rank=3:step=8");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.StateHash(), Reference()) << r.output;
  auto fs = Failures(r.timeline);
  ASSERT_EQ(fs.size(), 1u) << r.timeline;
  EXPECT_EQ(Field(fs[0], "kind"), "\"rank-crash\"");
  EXPECT_EQ(Field(fs[0], "lost_nodes"), "[]");
  ExpectRecoveredFromMemory(fs[0]);
}

TEST(LauncherE2E, HangDetectedWithinTimeoutPlusOneSecond) {
  LaunchResult r = Launch("hang", HangTimeoutFlag() + " --inject hang:rank=5:step=8");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.StateHash(), Reference()) << r.output;
  auto fs = Failures(r.timeline);
  ASSERT_EQ(fs.size(), 1u) << r.timeline;
  EXPECT_EQ(Field(fs[0], "kind"), "\"hang\"");
  // Rank 5 stopped; its peers soon wait for it in their collectives and fall silent too.
  EXPECT_NE(Field(fs[0], "detail").find("sent no heartbeat for"), std::string::npos) << fs[0];
  EXPECT_EQ(Field(fs[0], "detail").rfind("\"hang:rank=5:step=8; detected: rank ", 0), 0u) << fs[0];
  // Silence counts from the last beat: detected after the timeout, and within a second of it. The
  // latency counts from the hang; the rank detected may have sent its last beat a little before
  // it (a peer waiting in a collective), by more under a sanitizer's slowness: 0.1 s per unit of
  // MEMENTO_TEST_TIME_SCALE.
  EXPECT_GE(Number(fs[0], "detection_latency_s"), HangTimeout() - 0.1 * TimeScale()) << fs[0];
  EXPECT_LE(Number(fs[0], "detection_latency_s"), HangTimeout() + 1.0 * TimeScale()) << fs[0];
  ExpectRecoveredFromMemory(fs[0]);
}

TEST(LauncherE2E, AgentCrashKeepsMemory) {
  LaunchResult r = Launch("agentcrash", "--inject agent-crash:node=1:step=8");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.StateHash(), Reference()) << r.output;
  auto fs = Failures(r.timeline);
  ASSERT_EQ(fs.size(), 1u) << r.timeline;
  EXPECT_EQ(Field(fs[0], "kind"), "\"agent-crash\"");
  EXPECT_EQ(Field(fs[0], "lost_nodes"), "[]");  // the node's memory outlived its agent
  ExpectRecoveredFromMemory(fs[0]);
}

// Node 1's agent freezes (SIGSTOP) in its first erasure coding: its ranks' next snapshots wait for
// it and beat "waiting"; the other ranks wait for them in their collectives and fall silent. The
// verdict names the rank whose snapshot waits, not one of the silent ones.
TEST(LauncherE2E, SnapshotWaitingForAFrozenAgentIsAHangThatNamesTheWait) {
  const std::string marker = TestTmp() + "/" + UniqueJob("frozen-marker");
  LaunchResult r = Launch("frozen", "--ec rs:2 --spares 1 " + HangTimeoutFlag(),
                          "MEMENTO_KILL_POINT=agent.encode:rank=1:stop=1:once=" + marker);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.StateHash(), Reference()) << r.output;
  struct stat st {};
  EXPECT_EQ(::stat(marker.c_str(), &st), 0) << "the kill point never fired";
  auto fs = Failures(r.timeline);
  ASSERT_EQ(fs.size(), 1u) << r.timeline;
  EXPECT_EQ(Field(fs[0], "kind"), "\"hang\"");
  EXPECT_EQ(Field(fs[0], "injected"), "false");
  const std::string detail = Field(fs[0], "detail");
  EXPECT_TRUE(detail.rfind("\"rank 2 has waited ", 0) == 0 || detail.rfind("\"rank 3 has waited ", 0) == 0) << detail;
  EXPECT_NE(detail.find(" s for its agent to take its snapshot of step "), std::string::npos) << detail;
  ExpectRecoveredFromMemory(fs[0]);
}

TEST(LauncherE2E, TwoNodesAtOnce) {
  LaunchResult r =
      Launch("twonodes", "--ec rs:2 --spares 2 --inject node-loss:node=1:step=10 --inject node-loss:node=3:step=10");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.StateHash(), Reference()) << r.output;
  auto fs = Failures(r.timeline);
  ASSERT_EQ(fs.size(), 1u) << r.timeline;
  EXPECT_EQ(Field(fs[0], "lost_nodes"), "[1,3]");
  EXPECT_EQ(Field(fs[0], "replacements"), "[4,5]");
  ExpectRecoveredFromMemory(fs[0]);
}

TEST(LauncherE2E, NodeLossDuringRecovery) {
  LaunchResult r = Launch("duringrecovery",
                          "--ec rs:2 --spares 1 --inject rank-crash:rank=0:step=8 "
                          "--inject node-loss:node=2:during=recovery");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.StateHash(), Reference()) << r.output;
  auto fs = Failures(r.timeline);
  ASSERT_EQ(fs.size(), 2u) << r.timeline;
  EXPECT_EQ(Field(fs[0], "kind"), "\"rank-crash\"");
  EXPECT_EQ(Field(fs[1], "kind"), "\"node-loss\"");
  EXPECT_EQ(Field(fs[1], "attempt"), "1");
  EXPECT_EQ(Field(fs[1], "lost_nodes"), "[2]");
  ExpectRecoveredFromMemory(fs[1]);
  EXPECT_NE(r.timeline.find("\"restarts\":2,"), std::string::npos) << r.timeline;
}

TEST(LauncherE2E, SeveralKindsInOneRun) {
  LaunchResult r = Launch("combined",
                          "--ec rs:2 --spares 1 " + HangTimeoutFlag() + " --inject rank-crash:rank=1:step=5 "
                          "--inject hang:rank=6:step=11 --inject node-loss:node=3:step=17");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.StateHash(), Reference()) << r.output;
  auto fs = Failures(r.timeline);
  ASSERT_EQ(fs.size(), 3u) << r.timeline;
  EXPECT_EQ(Field(fs[0], "kind"), "\"rank-crash\"");
  EXPECT_EQ(Field(fs[1], "kind"), "\"hang\"");
  EXPECT_EQ(Field(fs[2], "kind"), "\"node-loss\"");
  for (const auto& f : fs) ExpectRecoveredFromMemory(f);
  EXPECT_NE(r.timeline.find("\"restarts\":3,"), std::string::npos) << r.timeline;
}

TEST(LauncherE2E, MoreFailuresThanAllowed) {
  LaunchResult r = Launch("toomany",
                          "--max-restarts 1 --inject rank-crash:rank=0:step=5 --inject rank-crash:rank=1:step=10");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("gave up: failure 2 (rank-crash) came after 1 restarts (--max-restarts 1)"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(Failures(r.timeline).size(), 2u) << r.timeline;
  EXPECT_NE(r.timeline.find("\"exit_code\":1,"), std::string::npos) << r.timeline;
}

TEST(LauncherE2E, NodeLossWithoutSpare) {
  LaunchResult r = Launch("nospare", "--ec rs:2 --inject node-loss:node=2:step=6");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("stopped: node 2 was lost and no spare is left (--spares 0)"), std::string::npos)
      << r.output;
}

TEST(LauncherE2E, AFailureBeforeAnythingWasSavedStartsTheTrainingOver) {
  // Rank 3 dies while copying step 1 (a client kill point, once): no version was ever complete,
  // though the other ranks reported step 1. Nothing saved is lost by starting over, so memento-run
  // does, and the training ends in the reference state.
  const std::string once = TestTmp() + "/nothingsaved-killed";
  LaunchResult r = Launch("nothingsaved", "", "MEMENTO_KILL_POINT=client.during_copy:rank=3:step=1:once=" + once);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  struct stat st {};
  ASSERT_EQ(::stat(once.c_str(), &st), 0) << "the kill point never fired";
  EXPECT_EQ(r.StateHash(), Reference()) << r.output;
  auto fs = Failures(r.timeline);
  ASSERT_EQ(fs.size(), 1u) << r.timeline;
  EXPECT_EQ(Field(fs[0], "lost_nodes"), "[]");
  EXPECT_EQ(Field(fs[0], "restored_step"), "-1");
  EXPECT_GE(std::atol(Field(fs[0], "last_step").c_str()), 1) << fs[0];  // past step 0: it stopped before
  EXPECT_NE(Field(fs[0], "source").find(kNothingSaved), std::string::npos) << fs[0];
}

TEST(LauncherE2E, NothingRecoverable) {
  // No parity and no storage: the lost node's ranks have nothing to come back to.
  LaunchResult r = Launch("unrecoverable", "--spares 1 --inject node-loss:node=1:step=6");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("found no version to restore"), std::string::npos) << r.output;
  auto fs = Failures(r.timeline);
  ASSERT_EQ(fs.size(), 2u) << r.timeline;
  EXPECT_EQ(Field(fs[1], "kind"), "\"unrecoverable\"");
  EXPECT_EQ(Field(fs[0], "restored_step"), "-1");
  // Something had been saved (the lost node's memory held it): the stop does not say otherwise.
  EXPECT_EQ(Field(fs[1], "detail").find(kNothingSaved), std::string::npos) << fs[1];
}

}  // namespace
}  // namespace memento::testing
