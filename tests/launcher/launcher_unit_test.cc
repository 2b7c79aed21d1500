// memento-run's parts without processes: options, drills, command lines (mpirun and srun),
// hostfiles, heartbeat datagrams and the timeline.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include <fstream>
#include <string>
#include <vector>

#include "core/heartbeat.h"
#include "launcher/commands.h"
#include "launcher/options.h"
#include "launcher/timeline.h"

namespace memento::launcher {
namespace {

Result<Options> Parse(std::vector<std::string> args) {
  args.insert(args.begin(), "memento-run");
  std::vector<const char*> argv;
  for (auto& a : args) argv.push_back(a.c_str());
  return ParseOptions(static_cast<int>(argv.size()), argv.data());
}

std::string Error(std::vector<std::string> args) {
  auto r = Parse(std::move(args));
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  return r.ok() ? "" : r.status().message();
}

TEST(LauncherOptions, ParsesEveryFlag) {
  auto o = Parse({"--simulate-nodes", "4", "--ranks-per-node=2", "--spares", "1", "--ec", "rs:2", "--group-size", "4",
                  "--storage", "/ckpt", "--flush-every", "10", "--max-restarts", "5", "--hang-timeout", "2.5",
                  "--inject", "node-loss:node=2:step=12", "--inject", "hang:rank=3:step=7", "--job", "j1", "--quiet",
                  "--", "train", "--steps", "30"});
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->simulate_nodes, 4);
  EXPECT_EQ(o->ranks_per_node, 2);
  EXPECT_EQ(o->spares, 1);
  EXPECT_EQ(o->ec, "rs:2");
  EXPECT_EQ(o->group_size, 4);
  EXPECT_EQ(o->storage, "/ckpt");
  EXPECT_EQ(o->flush_every, 10);
  EXPECT_EQ(o->max_restarts, 5);
  EXPECT_DOUBLE_EQ(o->hang_timeout_s, 2.5);
  ASSERT_EQ(o->injections.size(), 2u);
  EXPECT_EQ(o->injections[0].kind, Injection::Kind::kNodeLoss);
  EXPECT_EQ(o->injections[0].target, 2);
  EXPECT_EQ(o->injections[0].step, 12);
  EXPECT_EQ(o->injections[1].kind, Injection::Kind::kHang);
  EXPECT_EQ(o->injections[1].target, 3);
  EXPECT_EQ(o->job, "j1");
  EXPECT_TRUE(o->quiet);
  EXPECT_EQ(o->command, (std::vector<std::string>{"train", "--steps", "30"}));
}

TEST(LauncherOptions, ClearErrors) {
  EXPECT_EQ(Error({"--simulate-nodes", "2"}), "no training command: put it after '--'");
  EXPECT_EQ(Error({"--", "train"}), "give exactly one of --hostfile F and --simulate-nodes N");
  EXPECT_EQ(Error({"--simulate-nodes", "2", "--hostfile", "h", "--", "t"}),
            "give exactly one of --hostfile F and --simulate-nodes N");
  EXPECT_EQ(Error({"--simulate-nodes", "zero", "--", "t"}), "--simulate-nodes expects an integer >= 1, got 'zero'");
  EXPECT_EQ(Error({"--simulate-nodes", "2", "--hang-timeout", "-1", "--", "t"}),
            "--hang-timeout expects a non-negative number of seconds, got '-1'");
  EXPECT_EQ(Error({"--simulate-nodes", "2", "--ec", "rs:x", "--", "t"}).rfind("--ec: ", 0), 0u);
  EXPECT_EQ(Error({"--simulate-nodes", "2", "--frobnicate", "1", "--", "t"}), "unknown option '--frobnicate' (see --help)");
  EXPECT_EQ(Error({"--simulate-nodes", "2", "train"}),
            "unexpected argument 'train': the training command goes after '--'");
  EXPECT_EQ(Error({"--simulate-nodes", "2", "--job", "a b", "--", "t"}),
            "--job 'a b' may hold only letters, digits, '-', '_' and '.'");
  EXPECT_EQ(Error({"--simulate-nodes", "2", "--inject", "node-loss:node=2:step=3", "--", "t"}),
            "--inject 'node-loss:node=2:step=3': there are only 2 nodes (ids 0..1)");
  EXPECT_EQ(Error({"--simulate-nodes", "2", "--inject", "rank-crash:rank=2:step=3", "--", "t"}),
            "--inject 'rank-crash:rank=2:step=3': there are only 2 ranks");
  EXPECT_EQ(Error({"--hostfile", "h", "--inject", "hang:rank=0:step=3", "--", "t"}),
            "--inject needs --simulate-nodes: drills kill local processes and delete local memory");
  EXPECT_EQ(Error({"--simulate-nodes", "2", "--restore-from", "/ucp", "--", "t"}),
            "--restore-from needs --storage (where the resumed job's checkpoints go)");
  EXPECT_EQ(Error({"--simulate-nodes", "2", "--launcher", "ssh", "--", "t"}),
            "--launcher expects auto, mpirun or srun, got 'ssh'");
}

TEST(LauncherOptions, Injections) {
  auto in = ParseInjection("node-loss:node=1:during=recovery");
  ASSERT_TRUE(in.ok());
  EXPECT_TRUE(in->during_recovery);
  EXPECT_EQ(in->target, 1);
  auto ac = ParseInjection("agent-crash:node=0:step=4");
  ASSERT_TRUE(ac.ok());
  EXPECT_EQ(ac->kind, Injection::Kind::kAgentCrash);
  EXPECT_EQ(ParseInjection("meteor:node=1:step=2").status().message(),
            "--inject 'meteor:node=1:step=2': unknown kind 'meteor' (node-loss, rank-crash, hang or agent-crash)");
  EXPECT_EQ(ParseInjection("rank-crash:node=1:step=2").status().message(),
            "--inject 'rank-crash:node=1:step=2': unexpected 'node=1' (rank-crash takes rank=N and step=S)");
  EXPECT_EQ(ParseInjection("hang:rank=1").status().message(), "--inject 'hang:rank=1': needs step=S");
  EXPECT_EQ(ParseInjection("hang:step=3").status().message(), "--inject 'hang:step=3': needs rank=N");
  EXPECT_EQ(ParseInjection("rank-crash:rank=1:step=0").status().message(),
            "--inject 'rank-crash:rank=1:step=0': step must be a positive integer, got '0'");
  EXPECT_EQ(ParseInjection("node-loss:node=1:step=2:during=recovery").status().message(),
            "--inject 'node-loss:node=1:step=2:during=recovery': needs either step=S or during=recovery, not both");
}

std::vector<Injection> Drills(const std::vector<std::string>& specs) {
  std::vector<Injection> out;
  for (const std::string& s : specs) {
    auto in = ParseInjection(s);
    EXPECT_TRUE(in.ok()) << s;
    if (in.ok()) out.push_back(*in);
  }
  return out;
}

// The step drills a heartbeat fires, and with them every drill of the same step: two nodes lost "at
// once" are one failure even when one node's ranks lag a step behind the other's.
TEST(LauncherDrills, DrillsOfOneStepFireTogether) {
  auto d = Drills({"node-loss:node=1:step=10", "node-loss:node=3:step=10", "rank-crash:rank=0:step=12",
                   "hang:rank=5:step=10", "node-loss:node=2:during=recovery", "agent-crash:node=0:step=10"});
  auto all_known = [](int) { return true; };
  auto none_known = [](int) { return false; };
  std::vector<bool> fired(d.size(), false);
  // Rank 2 (node 1) reaches step 9: nothing; step 10: node 1, then node 3, rank 5 and node 0's agent.
  EXPECT_EQ(StepDrillsFired(d, fired, 2, 1, 9, all_known), std::vector<size_t>{});
  EXPECT_EQ(StepDrillsFired(d, fired, 2, 1, 10, all_known), (std::vector<size_t>{0, 1, 3, 5}));
  // A rank drill whose rank has no pid yet waits for its own heartbeat; node drills do not wait.
  EXPECT_EQ(StepDrillsFired(d, fired, 2, 1, 10, none_known), (std::vector<size_t>{0, 1, 5}));
  // Then rank 5's own heartbeat fires its drill.
  fired = {true, true, false, false, false, true};
  EXPECT_EQ(StepDrillsFired(d, fired, 5, 2, 11, none_known), (std::vector<size_t>{3}));
  // Fired drills do not fire again; a later step fires a drill of an earlier one that was missed.
  fired = {true, true, false, true, false, true};
  EXPECT_EQ(StepDrillsFired(d, fired, 6, 3, 11, all_known), std::vector<size_t>{});
  EXPECT_EQ(StepDrillsFired(d, fired, 0, 0, 13, all_known), std::vector<size_t>{2});
  // during=recovery drills are not step drills.
  EXPECT_EQ(StepDrillsFired(Drills({"node-loss:node=2:during=recovery"}), {false}, 4, 2, 50, all_known),
            std::vector<size_t>{});
}

Options Simulated() {
  auto o = Parse({"--simulate-nodes", "4", "--ranks-per-node", "2", "--ec", "rs:2", "--job", "j", "--storage", "/s",
                  "--flush-every", "5", "--", "train", "--steps", "9"});
  EXPECT_TRUE(o.ok());
  return *o;
}

TEST(LauncherCommands, MpirunSimulatedNodes) {
  Options o = Simulated();
  NodePlan plan{{0, 1, 4, 3}, {}};
  Command a = AgentCommand(o, plan, false, "/b/memento-agent", "/w", "tok");
  EXPECT_EQ(a.ToString(),
            "mpirun -np 4 --oversubscribe --bind-to none -x MEMENTO_JOB_TOKEN /b/memento-agent --job j --socket "
            "/w/node-%n/agent.sock --catalog /w/node-%n/catalog --pid-file /w/node-%n/agent.pid --node-ids 0,1,4,3 "
            "--ec rs:2 --storage /s --flush-every 5");
  ASSERT_EQ(a.env.size(), 1u);
  EXPECT_EQ(a.env[0], (std::pair<std::string, std::string>{"MEMENTO_JOB_TOKEN", "tok"}));
  Command t = TrainingCommand(o, plan, false, "/w", "tok", "127.0.0.1:9", "latest", 3);
  EXPECT_EQ(t.ToString(),
            "mpirun -np 8 --oversubscribe --bind-to none -x MEMENTO_JOB_ID -x MEMENTO_JOB_TOKEN -x MEMENTO_AGENT_SOCKET "
            "-x MEMENTO_RANKS_PER_NODE -x MEMENTO_NODE_IDS -x MEMENTO_RESTORE -x MEMENTO_HEARTBEAT -x MEMENTO_ATTEMPT "
            "train --steps 9");
  std::map<std::string, std::string> env(t.env.begin(), t.env.end());
  EXPECT_EQ(env["MEMENTO_JOB_ID"], "j");
  EXPECT_EQ(env["MEMENTO_AGENT_SOCKET"], "/w/node-%n/agent.sock");
  EXPECT_EQ(env["MEMENTO_RANKS_PER_NODE"], "2");
  EXPECT_EQ(env["MEMENTO_NODE_IDS"], "0,1,4,3");
  EXPECT_EQ(env["MEMENTO_RESTORE"], "latest");
  EXPECT_EQ(env["MEMENTO_HEARTBEAT"], "127.0.0.1:9");
  EXPECT_EQ(env["MEMENTO_ATTEMPT"], "3");
}

TEST(LauncherCommands, RestoreFromGoesToTheAgents) {
  Options o = Simulated();
  o.restore_from = "/ckpt/ucp-8";
  NodePlan plan{{0, 1}, {}};
  EXPECT_EQ(AgentCommand(o, plan, false, "a", "/w", "t").ToString(),
            "mpirun -np 2 --oversubscribe --bind-to none -x MEMENTO_JOB_TOKEN a --job j --socket /w/node-%n/agent.sock "
            "--catalog /w/node-%n/catalog --pid-file /w/node-%n/agent.pid --node-ids 0,1 --ec rs:2 --storage /s "
            "--flush-every 5 --restore-from /ckpt/ucp-8");
}

TEST(LauncherCommands, MpirunHosts) {
  Options o = Simulated();
  NodePlan plan{{0, 2}, {"gpu01", "gpu03"}};
  EXPECT_EQ(AgentCommand(o, plan, false, "memento-agent", "/tmp/m", "t").ToString(),
            "mpirun -np 2 --bind-to none --host gpu01:1,gpu03:1 --map-by ppr:1:node -x MEMENTO_JOB_TOKEN memento-agent --job j "
            "--socket /tmp/m/node-%n/agent.sock --catalog /tmp/m/node-%n/catalog --pid-file /tmp/m/node-%n/agent.pid "
            "--node-ids 0,2 --ec rs:2 --storage /s --flush-every 5");
  EXPECT_EQ(TrainingCommand(o, plan, false, "/tmp/m", "t", "h:1", "latest").ToString(),
            "mpirun -np 4 --host gpu01:2,gpu03:2 --map-by ppr:2:node -x MEMENTO_JOB_ID -x MEMENTO_JOB_TOKEN -x "
            "MEMENTO_AGENT_SOCKET -x MEMENTO_RANKS_PER_NODE -x MEMENTO_NODE_IDS -x MEMENTO_RESTORE -x "
            "MEMENTO_HEARTBEAT -x MEMENTO_ATTEMPT train --steps 9");
}

TEST(LauncherCommands, Srun) {
  Options o = Simulated();
  o.mpirun_args = {"--mpi=pmix"};
  NodePlan plan{{0, 2}, {"gpu01", "gpu03"}};
  EXPECT_EQ(AgentCommand(o, plan, true, "memento-agent", "/tmp/m", "t").ToString(),
            "srun --cpu-bind=none --nodes=2 --ntasks=2 --ntasks-per-node=1 --distribution=block --kill-on-bad-exit=1 "
            "--export=ALL --nodelist=gpu01,gpu03 --mpi=pmix memento-agent --job j --socket /tmp/m/node-%n/agent.sock --catalog "
            "/tmp/m/node-%n/catalog --pid-file /tmp/m/node-%n/agent.pid --node-ids 0,2 --ec rs:2 --storage /s "
            "--flush-every 5");
  EXPECT_EQ(TrainingCommand(o, plan, true, "/tmp/m", "t", "h:1", "latest").ToString(),
            "srun --nodes=2 --ntasks=4 --ntasks-per-node=2 --distribution=block --kill-on-bad-exit=1 --export=ALL "
            "--nodelist=gpu01,gpu03 --mpi=pmix train --steps 9");
  EXPECT_TRUE(UsesSrun(o, true));
  EXPECT_FALSE(UsesSrun(o, false));
  o.launcher = Launcher::kMpirun;
  EXPECT_FALSE(UsesSrun(o, true));
  o.launcher = Launcher::kSrun;
  EXPECT_TRUE(UsesSrun(o, false));
}

TEST(LauncherCommands, QuotesWhatTheShellWouldSplit) {
  Command c;
  c.argv = {"train", "--name", "a b", "--x", "it's"};
  EXPECT_EQ(c.ToString(), "train --name 'a b' --x 'it's'");
}

TEST(LauncherCommands, Hostfile) {
  const std::string path = "/tmp/memento-hostfile-" + std::to_string(::getpid());
  {
    std::ofstream f(path);
    f << "# cluster\ngpu01 slots=8\n\ngpu02   # rack 2\ngpu03 max_slots=4\n";
  }
  auto hosts = ReadHostfile(path);
  ASSERT_TRUE(hosts.ok()) << hosts.status().ToString();
  EXPECT_EQ(*hosts, (std::vector<std::string>{"gpu01", "gpu02", "gpu03"}));
  {
    std::ofstream f(path);
    f << "gpu01\ngpu01\n";
  }
  EXPECT_EQ(ReadHostfile(path).status().message(), "hostfile " + path + " line 2: host 'gpu01' is listed twice");
  {
    std::ofstream f(path);
    f << "gpu01 cores=4\n";
  }
  EXPECT_EQ(ReadHostfile(path).status().message(),
            "hostfile " + path + " line 1: unexpected 'cores=4' (expected 'host' or 'host slots=N')");
  ::unlink(path.c_str());
  EXPECT_EQ(ReadHostfile(path).status().code(), StatusCode::kNotFound);
}

TEST(Heartbeat, FormatAndParse) {
  Beat b;
  b.job = "j1";
  b.rank = 3;
  b.pid = 4242;
  b.phase = BeatPhase::kRestored;
  b.step = 17;
  b.detail = "/ckpt/j1/step-17 (with spaces)";
  const std::string text = FormatBeat(b);
  EXPECT_EQ(text, "MHB1 j1 3 4242 restored 17 /ckpt/j1/step-17 (with spaces)");
  auto back = ParseBeat(text);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->job, "j1");
  EXPECT_EQ(back->rank, 3);
  EXPECT_EQ(back->pid, 4242);
  EXPECT_EQ(back->phase, BeatPhase::kRestored);
  EXPECT_EQ(back->step, 17);
  EXPECT_EQ(back->detail, b.detail);
  EXPECT_EQ(ParseBeat("hello").status().message(), "not a memento heartbeat (no MHB1 prefix)");
  EXPECT_EQ(ParseBeat("MHB1 j 1 2 dancing 3").status().message(), "heartbeat with unknown phase 'dancing'");
  EXPECT_EQ(ParseBeat("MHB1 j x").status().message(),
            "malformed heartbeat 'MHB1 j x': expected job, rank, pid, phase and step");
}

TEST(Heartbeat, SenderToReceiver) {
  auto rx = HeartbeatReceiver::Create();
  ASSERT_TRUE(rx.ok()) << rx.status().ToString();
  auto tx = HeartbeatSender::Create("127.0.0.1:" + std::to_string((*rx)->port()), "job7", 5);
  ASSERT_TRUE(tx.ok()) << tx.status().ToString();
  (*tx)->Send(BeatPhase::kStep, 9);
  auto got = (*rx)->Receive(5000);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->job, "job7");
  EXPECT_EQ(got->rank, 5);
  EXPECT_EQ(got->pid, ::getpid());
  EXPECT_EQ(got->phase, BeatPhase::kStep);
  EXPECT_EQ(got->step, 9);
  {
    HeartbeatSender::KeepAlive alive(tx->get(), 4);
    auto waiting = (*rx)->Receive(5000);
    ASSERT_TRUE(waiting.ok()) << waiting.status().ToString();
    EXPECT_EQ(waiting->phase, BeatPhase::kWaiting);
    EXPECT_EQ(waiting->step, 4);  // memento-run tells a capture waiting for its agent by the step
  }
  EXPECT_EQ((*rx)->Receive(0).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(HeartbeatSender::Create("nohostport", "j", 0).status().message(),
            "heartbeat address 'nohostport' is not host:port");
}

TEST(Timeline, JsonAndText) {
  Timeline t;
  t.job = "j";
  t.outcome = "training finished";
  t.restarts = 1;
  t.total_s = 9.5;
  Failure f;
  f.kind = "node-loss";
  f.detail = "node-loss:node=2:step=12";
  f.injected = true;
  f.happened_s = 2;
  f.detected_s = 2.25;
  f.last_step = 12;
  f.stop_s = 0.5;
  f.lost_nodes = {2};
  f.replacements = {4};
  f.agent_restart_s = 0.4;
  f.registration_s = 0.3;
  f.rebuild_s = 0.2;
  f.restore_s = 0.1;
  f.resumed_after_s = 1.5;
  f.restored_step = 11;
  f.source = "memory";
  f.steps_lost = 1;
  t.failures.push_back(f);
  EXPECT_EQ(TimelineJson(t),
            "{\"job\":\"j\",\"outcome\":\"training finished\",\"exit_code\":0,\"restarts\":1,\"total_s\":9.500,"
            "\"failures\":[{\"attempt\":0,\"kind\":\"node-loss\",\"detail\":\"node-loss:node=2:step=12\","
            "\"injected\":true,\"happened_s\":2.000,\"detected_s\":2.250,\"detection_latency_s\":0.250,"
            "\"last_step\":12,\"stop_s\":0.500,\"lost_nodes\":[2],\"replacements\":[4],\"agent_restart_s\":0.400,"
            "\"registration_s\":0.300,\"rebuild_s\":0.200,\"restore_s\":0.100,\"resumed_after_s\":1.500,"
            "\"restored_step\":11,\"source\":\"memory\",\"steps_lost\":1}]}\n");
  EXPECT_EQ(FormatTimeline(t),
            "memento-run: job j: training finished (1 restart, 9.50 s)\n"
            "  failure 1: node-loss (node-loss:node=2:step=12) at 2.00 s, step 12\n"
            "    detected after 0.25 s; both jobs stopped in 0.50 s; lost node(s) 2, replaced by spare(s) 4\n"
            "    recovery: agents restarted in 0.40 s, registration 0.30 s, rebuild 0.20 s, restore 0.10 s\n"
            "    restored step 11 from memory; 1 step lost; training resumed 1.50 s after the failure\n");
}

// What a SIGKILLed mpirun leaves: its session directory. Only that pid's directory of this user's
// Open MPI trees goes.
TEST(LauncherCommands, RemoveMpiSessionDirRemovesOnlyTheDeadJobsDirectory) {
  namespace fs = std::filesystem;
  const char* tmp = std::getenv("MEMENTO_TEST_TMP");
  const fs::path base = fs::path(tmp ? tmp : "/tmp") / ("mpi-session-" + std::to_string(::getpid()));
  const std::string uid = std::to_string(::getuid());
  const std::string other_uid = std::to_string(::getuid() + 1);
  for (const fs::path& d : {base / ("ompi.node7." + uid) / "pid.4242" / "0" / "1",
                            base / ("ompi.node7." + uid) / "pid.42420", base / ("ompi.node7." + other_uid) / "pid.4242",
                            base / "not-ompi" / "pid.4242"}) {
    fs::create_directories(d);
  }
  std::ofstream(base / ("ompi.node7." + uid) / "pid.4242" / "contact.txt") << "4242\n";
  EXPECT_EQ(RemoveMpiSessionDir(4242, base.string()), 1);
  EXPECT_FALSE(fs::exists(base / ("ompi.node7." + uid) / "pid.4242"));
  EXPECT_TRUE(fs::exists(base / ("ompi.node7." + uid) / "pid.42420"));
  EXPECT_TRUE(fs::exists(base / ("ompi.node7." + other_uid) / "pid.4242"));
  EXPECT_TRUE(fs::exists(base / "not-ompi" / "pid.4242"));
  EXPECT_EQ(RemoveMpiSessionDir(4242, base.string()), 0);
  EXPECT_EQ(RemoveMpiSessionDir(4242, (base / "missing").string()), 0);
  fs::remove_all(base);
}

// With a real mpirun: SIGKILL leaves its session directory (the fault), which is then removed.
TEST(LauncherCommands, AKilledMpirunsSessionDirectoryIsRemoved) {
  namespace fs = std::filesystem;
  const char* tmp = std::getenv("MEMENTO_TEST_TMP");
  const fs::path base = fs::path(tmp ? tmp : "/tmp") / ("mpirun-killed-" + std::to_string(::getpid()));
  fs::create_directories(base);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setpgid(0, 0);
    ::setenv("OMPI_MCA_orte_tmpdir_base", base.c_str(), 1);
    ::execlp("mpirun", "mpirun", "--oversubscribe", "-np", "1", "sleep", "60", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ASSERT_GT(pid, 0);
  ::setpgid(pid, pid);
  const fs::path session_name = "pid." + std::to_string(pid);
  auto session_dirs = [&] {
    int n = 0;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(base, ec)) n += fs::exists(e.path() / session_name) ? 1 : 0;
    return n;
  };
  // The job is up once the rank's directory exists under mpirun's session directory.
  bool up = false;
  for (int i = 0; i < 3000 && !up; ++i) {
    up = session_dirs() == 1;
    if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(-pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(up) << "mpirun made no session directory under " << base;
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  EXPECT_EQ(session_dirs(), 1) << "SIGKILL should leave mpirun's session directory";
  EXPECT_EQ(RemoveMpiSessionDir(pid, base.string()), 1);
  EXPECT_EQ(session_dirs(), 0);
  fs::remove_all(base);
}

}  // namespace
}  // namespace memento::launcher
