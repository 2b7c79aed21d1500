// The agent's flusher: writes the local ranks' files of one version to storage on its own
// threads (training never waits for it), and on node 0 commits the manifest once every agent's
// files are durable, then applies retention. Also loads persisted checkpoints back into slots.
// All I/O goes through a FileSystem. Thread-safe: NodeState starts jobs and polls progress.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "agent/agent.h"
#include "core/file_system.h"
#include "core/shared_memory.h"
#include "core/status.h"
#include "core/thread_pool.h"
#include "proto/memento.pb.h"

namespace memento {

class Flusher {
 public:
  enum class State : int32_t {
    kIdle = 0,
    kWriting = 1,
    kWritten = 2,     // this agent's ranks' files are durable
    kFailed = 3,
    kCommitting = 4,  // node 0: writing the manifest
    kCommitted = 5,
    kCommitFailed = 6,
  };
  struct Progress {
    int64_t step = -1;
    State state = State::kIdle;
    std::string error;
  };
  struct RankJob {
    proto::RankRecord layout;
    std::shared_ptr<SharedMemory> slot;  // kept mapped while it is written
    std::vector<proto::RegionCrc> crcs;  // the capture's CRCs of the slot's regions (reused)
  };

  Flusher(const AgentOptions& options, FileSystem* fs, int node_id);
  ~Flusher();

  // While `busy` answers true (captures of the training ranks in flight), the writer pauses
  // between pieces, at most 200 ms per 16 MiB written: training goes first, flushing still progresses
  // (at least 80 MB/s).
  void SetYield(std::function<bool()> busy) { busy_ = std::move(busy); }

  std::string JobDir() const;
  std::string StepDir(int64_t step) const;
  // Where `step` is read from: StepDir(step), or the --restore-from directory for its step.
  std::string SourceDir(int64_t step) const;
  // Reads the --restore-from checkpoint's step (universal or native manifest); InvalidArgument /
  // NotFound naming the directory when it is neither. Ok without --restore-from.
  Status OpenRestoreSource();

  // Writes each rank's files of `step` in the background. Requires state kIdle.
  void StartWrite(int64_t step, int32_t world_size, std::vector<RankJob> ranks);
  // Node 0: writes the manifest of `step` from the ranks' metadata files, then removes committed
  // checkpoints beyond keep_persisted and stale partial ones. Requires state kWritten for `step`.
  void StartCommit(int64_t step, int32_t world_size);
  Progress progress() const;
  // Back to kIdle once the agents consumed the outcome; false while a job is still running.
  bool Reset();

  // Removes step directories that have no manifest (a flush that never committed).
  Status RemovePartial();
  // Committed checkpoints, newest first, at most `n` (the --restore-from step among them).
  std::vector<int64_t> CommittedSteps(int n);
  // Fills `slot` (rank layout.rank()) from the committed checkpoint of `step`.
  Status Load(int64_t step, const proto::RankRecord& layout, uint8_t* slot);

 private:
  void Run(int64_t step, std::function<Status()> job, State done, State failed);
  Status WriteRanks(int64_t step, int32_t world_size, const std::vector<RankJob>& ranks);
  Status Commit(int64_t step, int32_t world_size);
  void ApplyRetention(int64_t step);

  const AgentOptions options_;
  FileSystem* fs_;
  const int node_id_;
  mutable std::mutex mu_;
  Progress progress_;    // GUARDED_BY(mu_)
  std::thread worker_;   // the running job, if any
  std::function<bool()> busy_;
  int64_t restore_from_step_ = -1;  // the --restore-from checkpoint's step; -1 = none
};

}  // namespace memento
