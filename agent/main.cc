// memento-agent: one per node, all agents of a job in one MPI job:
//   mpirun -np <nodes> memento-agent --job J [--socket PATH] [--catalog DIR] [--slots R] ...
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "agent/agent.h"
#include "agent/mpi_communicator.h"
#include "core/env.h"
#include "core/log.h"

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop.store(true); }

void Usage() {
  std::fprintf(stderr,
               "usage: memento-agent --job ID [options]\n"
               "  --job ID              job id (default MEMENTO_JOB_ID)\n"
               "  --token T             job token (default MEMENTO_JOB_TOKEN)\n"
               "  --node-id N           node id (default: MPI rank)\n"
               "  --socket PATH         Unix socket; %%n = node id (default /tmp/memento-<job>-node%%n.sock)\n"
               "  --catalog DIR         catalog directory; %%n = node id (default /tmp/memento-<job>-node%%n.catalog)\n"
               "  --pid-file PATH       write the agent's pid here once it serves; %%n = node id\n"
               "  --slots R             versions kept per rank (default 3; 4 with --storage; +1 with --ec)\n"
               "  --memory-budget B     bytes of slots at most, with K/M/G suffix (default: /dev/shm)\n"
               "  --crc-threads N       checksum threads (default: 3/4 of the CPUs, at least 4)\n"
               "  --tick-ms MS          agreement interval (default 2)\n"
               "  --storage DIR         flush checkpoints to DIR/<job>/step-<N>/ and restore from them\n"
               "  --restore-from DIR    resume from this universal or native checkpoint (any layout) when\n"
               "                        memory and --storage hold nothing newer; needs --storage\n"
               "  --flush-every N       flush only steps that are multiples of N (default: any)\n"
               "  --flush-interval S    at least S seconds between flushes (default 0)\n"
               "  --flush-bandwidth M   write-rate cap per agent, MB/s (default: none)\n"
               "  --flush-piece B       bytes written at a time; captures go first between pieces (default 1M)\n"
               "  --keep K              committed checkpoints kept (default 3)\n"
               "  --flush-retry S       first retry delay after a failed flush, seconds (default 1)\n"
               "  --inject-fs SPEC      tests only: fault-injecting storage (see core/file_system.h)\n"
               "  --ec SCHEME           none | replicate:R | xor | rs:M (default none)\n"
               "  --group-size N        agents per parity group (default: all)\n"
               "  --ec-encode HOW       holders (default: segments sent to parity holders) | partial\n"
               "  --topology FILE       '<node_id> <domain>' lines: groups spread over domains\n"
               "  --node-ids A,B,...    node id of each agent by MPI rank (replacement nodes)\n"
               "  --log-level L         debug|info|warning|error\n");
}

bool ParseBytes(const char* s, uint64_t* out) {
  char* end = nullptr;
  double v = std::strtod(s, &end);
  if (end == s || v < 0) return false;
  uint64_t mult = 1;
  if (*end == 'K' || *end == 'k') mult = 1ull << 10;
  else if (*end == 'M' || *end == 'm') mult = 1ull << 20;
  else if (*end == 'G' || *end == 'g') mult = 1ull << 30;
  else if (*end != '\0') return false;
  *out = static_cast<uint64_t>(v * static_cast<double>(mult));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  memento::AgentOptions opts;
  opts.job_id = memento::Env().job_id;
  opts.job_token = memento::Env().job_token;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "memento-agent: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    auto next_int = [&]() {
      const char* v = next();
      char* end = nullptr;
      long x = std::strtol(v, &end, 10);
      if (*end != '\0') {
        std::fprintf(stderr, "memento-agent: %s expects an integer, got '%s'\n", a.c_str(), v);
        std::exit(2);
      }
      return static_cast<int>(x);
    };
    if (a == "--job") opts.job_id = next();
    else if (a == "--token") opts.job_token = next();
    else if (a == "--node-id") opts.node_id = next_int();
    else if (a == "--socket") opts.socket_path = next();
    else if (a == "--catalog") opts.catalog_dir = next();
    else if (a == "--pid-file") opts.pid_file = next();
    else if (a == "--slots") opts.slots_per_rank = next_int();
    else if (a == "--crc-threads") opts.crc_threads = next_int();
    else if (a == "--tick-ms") opts.tick_ms = next_int();
    else if (a == "--storage") opts.storage_root = next();
    else if (a == "--restore-from") opts.restore_from = next();
    else if (a == "--flush-every") opts.flush_every = next_int();
    else if (a == "--keep") opts.keep_persisted = next_int();
    else if (a == "--inject-fs") opts.inject_fs = next();
    else if (a == "--ec") opts.ec = next();
    else if (a == "--group-size") opts.group_size = next_int();
    else if (a == "--ec-encode") opts.ec_encode = next();
    else if (a == "--topology") opts.topology = next();
    else if (a == "--node-ids") {
      std::string list = next();
      size_t pos = 0;
      while (pos <= list.size()) {
        size_t comma = list.find(',', pos);
        std::string item = list.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        char* end = nullptr;
        long v = std::strtol(item.c_str(), &end, 10);
        if (item.empty() || *end != '\0' || v < 0) {
          std::fprintf(stderr, "memento-agent: --node-ids expects non-negative integers, got '%s'\n", item.c_str());
          return 2;
        }
        opts.node_ids.push_back(static_cast<int>(v));
        if (comma == std::string::npos) break;
        pos = comma + 1;
      }
    }
    else if (a == "--flush-interval" || a == "--flush-bandwidth" || a == "--flush-retry") {
      const char* v = next();
      char* end = nullptr;
      double x = std::strtod(v, &end);
      if (*end != '\0' || x < 0) {
        std::fprintf(stderr, "memento-agent: %s expects a non-negative number, got '%s'\n", a.c_str(), v);
        return 2;
      }
      (a == "--flush-interval" ? opts.flush_interval_s : a == "--flush-bandwidth" ? opts.flush_bandwidth_mbps
                                                                                 : opts.flush_retry_s) = x;
    }
    else if (a == "--flush-piece") {
      const char* v = next();
      if (!ParseBytes(v, &opts.flush_piece_bytes) || opts.flush_piece_bytes < 4096) {
        std::fprintf(stderr, "memento-agent: --flush-piece expects bytes of at least 4K, like 4M, got '%s'\n", v);
        return 2;
      }
    }
    else if (a == "--memory-budget") {
      const char* v = next();
      if (!ParseBytes(v, &opts.memory_budget_bytes)) {
        std::fprintf(stderr, "memento-agent: --memory-budget expects bytes like 512M or 4G, got '%s'\n", v);
        return 2;
      }
    } else if (a == "--log-level") {
      std::string l = next();
      memento::SetLogLevel(l == "debug" ? memento::LogLevel::kDebug
                           : l == "warning" ? memento::LogLevel::kWarning
                           : l == "error" ? memento::LogLevel::kError
                                          : memento::LogLevel::kInfo);
    } else if (a == "-h" || a == "--help") {
      Usage();
      return 0;
    } else {
      std::fprintf(stderr, "memento-agent: unknown option '%s'\n", a.c_str());
      Usage();
      return 2;
    }
  }
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGPIPE, SIG_IGN);
  memento::Status st = memento::InitMpi(&argc, &argv);
  if (!st.ok()) {
    std::fprintf(stderr, "memento-agent: %s\n", st.ToString().c_str());
    return 1;
  }
  auto comm = memento::MakeMpiCommunicator();
  st = memento::RunAgent(opts, comm.get(), &g_stop);
  memento::FinalizeMpi();
  if (!st.ok()) {
    std::fprintf(stderr, "memento-agent: %s\n", st.ToString().c_str());
    return 1;
  }
  return 0;
}
