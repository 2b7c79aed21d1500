// What every memento-bench subcommand shares: flag reading, exit codes, timing samples, the
// one-line JSON result, a multi-threaded memcpy (the host limit), host buffers, and a private
// memento-agent run as a child process. Thread-compatible unless a class says otherwise.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "core/thread_pool.h"

namespace memento::bench {

// Process exit codes of memento-bench.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;    // the benchmark ran and something failed
inline constexpr int kExitUsage = 2;     // bad command line
inline constexpr int kExitSkipped = 3;   // this build or machine cannot run it (no CUDA, no GPU)

using Clock = std::chrono::steady_clock;
inline double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// "1G", "256M", "64K", "4096", "1.5G" (binary multiples). False on anything else.
bool ParseByteSize(std::string_view text, uint64_t* out);

// Reads the flags of one subcommand in order: `--name value` or `--name=value`.
// Errors are InvalidArgument with a message that names the flag (the caller prints usage).
class FlagReader {
 public:
  FlagReader(int argc, char** argv) : argc_(argc), argv_(argv) {}
  // Moves to the next flag; false after the last. The flag's name (e.g. "--bytes") is name().
  bool Next();
  const std::string& name() const { return name_; }

  Status String(std::string* out);
  Status Bytes(uint64_t* out);                 // with K/M/G suffixes; must be > 0
  Status Int(int* out, int min_value);         // a decimal integer >= min_value
  Status Double(double* out, double min_value);
  // A flag that takes no value: InvalidArgument when `--name=value` was given.
  Status Switch(bool* out);
  Status Unknown() const { return InvalidArgument("unknown flag '" + name_ + "'"); }

 private:
  int argc_;
  char** argv_;
  int next_ = 0;
  std::string name_;
  std::string inline_value_;
  bool has_inline_value_ = false;
};

// Timings of repeated runs of one thing, in seconds.
class Samples {
 public:
  void Add(double seconds) { v_.push_back(seconds); }
  size_t size() const { return v_.size(); }
  double Min() const;
  double Max() const;
  double Median() const;  // the mean of the middle two for an even count; 0 when empty

 private:
  std::vector<double> v_;
};

// GB/s (10^9 bytes per second), the unit of every bandwidth memento prints.
inline double GBps(uint64_t bytes, double seconds) { return seconds > 0 ? bytes / seconds / 1e9 : 0; }

// Builds one JSON object on one line; keys keep the order they were added in.
class JsonLine {
 public:
  JsonLine& Add(std::string_view key, std::string_view value);
  JsonLine& Add(std::string_view key, const char* value) { return Add(key, std::string_view(value)); }
  JsonLine& Add(std::string_view key, double value);
  JsonLine& Add(std::string_view key, int64_t value);
  JsonLine& Add(std::string_view key, uint64_t value);
  JsonLine& Add(std::string_view key, int value) { return Add(key, static_cast<int64_t>(value)); }
  JsonLine& Add(std::string_view key, bool value);
  JsonLine& Add(std::string_view key, const std::vector<double>& values);  // an array of numbers
  std::string str() const { return "{" + body_ + "}"; }

 private:
  void Key(std::string_view key);
  std::string body_;
};

// Page-aligned anonymous host memory, every page written once (pre-faulted) on creation.
class HostBuffer {
 public:
  // Fills byte i with (seed + i * 131) & 0xff, so no page is a shared zero page.
  static Result<std::unique_ptr<HostBuffer>> Create(size_t bytes, uint8_t seed);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  HostBuffer(uint8_t* data, size_t size) : data_(data), size_(size) {}
  uint8_t* data_;
  size_t size_;
};

// One contiguous copy of a multi-buffer copy.
struct CopyRegion {
  uint8_t* dst = nullptr;
  const uint8_t* src = nullptr;
  size_t bytes = 0;
};

// Copies every region with the client's host-path split: tasks of `chunk_bytes` over `pool`,
// all submitted at once, then waits for them. Returns the seconds it took.
double ParallelMemcpy(ThreadPool* pool, const std::vector<CopyRegion>& regions, size_t chunk_bytes);

// A memento-agent of a private job, run as a child process for the length of one benchmark:
// socket and catalog in a fresh temporary directory. The destructor (also on error paths and on
// SIGINT/SIGTERM of the benchmark) stops the agent with SIGTERM, reaps it, removes the job's
// shared memory (/dev/shm/memento-<job>-*) and the temporary directory. Start() first removes what
// earlier benchmarks killed with SIGKILL left behind (their names carry their pid; the agent of
// such a one gets SIGTERM when its parent dies). One at a time per process.
class AgentProcess {
 public:
  struct Options {
    std::string agent_binary;        // default "": memento-agent next to this executable
    int slots_per_rank = 2;          // --slots
    uint64_t memory_budget_bytes = 0;  // --memory-budget; 0 = not passed
    int crc_threads = 0;             // --crc-threads; 0 = not passed (the agent's default, 4)
    int start_timeout_ms = 30000;    // how long to wait for the agent's socket
    std::string log_level = "warning";  // --log-level (debug|info|warning|error)
    std::vector<std::string> extra_args;  // appended to the agent's command line (e.g. --storage DIR)
  };

  static Result<std::unique_ptr<AgentProcess>> Start(const Options& options);
  ~AgentProcess();
  AgentProcess(const AgentProcess&) = delete;
  AgentProcess& operator=(const AgentProcess&) = delete;

  const std::string& job_id() const { return job_id_; }
  const std::string& socket_path() const { return socket_path_; }  // node 0's, "%n" expanded
  // The last `max_bytes` of what the agent printed (stdout and stderr), for error messages.
  std::string LogTail(size_t max_bytes = 4000) const;
  // Stops the agent now (SIGTERM, waits for it); the destructor still removes its files. For a
  // benchmark that reads the agent's final log lines or wants its threads gone before going on.
  void Shutdown() { Stop(); }

 private:
  AgentProcess() = default;
  Status Launch(const std::vector<std::string>& argv, bool under_mpirun);
  Status WaitForSocket(int timeout_ms);
  void Stop();

  std::string job_id_;
  std::string tmpdir_;
  std::string socket_path_;
  std::string log_path_;
  pid_t pid_ = -1;
};

// Directory of this executable (from /proc/self/exe).
std::string ExecutableDir();

// Paths (files or directories) that a SIGINT, SIGTERM or SIGHUP of the benchmark removes with
// `rm -rf` (after stopping the running agent, if any); at most 8 at a time. For what a benchmark
// creates outside AgentProcess's own directory. Forget them once removed.
void RemoveOnFatalSignal(const std::string& path);
void ForgetOnFatalSignal(const std::string& path);

// The kind of file system holding `path` ("ext4", "tmpfs", ...; the magic number in hex otherwise).
std::string FileSystemName(const std::string& path);

}  // namespace memento::bench
