// The memento client library: what a training rank links to register its tensors, take lazy
// asynchronous snapshots into its node agent's shared memory, and restore after a crash.
//
// Typical loop (see docs/integration.md):
//   auto client = Client::Connect(opts).value();
//   client->RegisterTensor("w", w.data(), DType::kF32, WholeTensor({1024, 1024}));
//   client->FinishRegistration();            // collective: returns once every rank registered
//   if (auto r = client->Restore(); r.ok()) start = r->step + 1;
//   for (step = start; ...) {
//     forward(); backward();                 // ... while the snapshot of the previous update copies
//     client->WaitUntilSafeToUpdate();       // blocks only while copies are still in flight
//     optimizer_step();
//     client->Snapshot(step);                // returns at once; copies run in the background
//   }
//
// Thread safety: a Client is used by one training thread at a time (its copy threads are
// internal). Snapshot() never blocks on the copy; errors of an asynchronous capture are returned
// by the next WaitUntilSafeToUpdate().
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/shard.h"
#include "core/status.h"

namespace memento {

struct ClientOptions {
  // Path of the node agent's Unix socket; "%n" is replaced by node_id.
  // Default "" = MEMENTO_AGENT_SOCKET.
  std::string agent_socket;
  // Job id and secret token; default "" = MEMENTO_JOB_ID / MEMENTO_JOB_TOKEN.
  std::string job_id;
  std::string job_token;
  // This rank in the training job, its index among the ranks of its node, and the job's size.
  // Default -1 = from the launcher's environment (OMPI_COMM_WORLD_RANK / _LOCAL_RANK / _SIZE,
  // or SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS).
  int rank = -1;
  int local_rank = -1;
  int world_size = -1;
  // The node this rank runs on; -1 = MEMENTO_NODE_ID, else rank / MEMENTO_RANKS_PER_NODE, else 0.
  int node_id = -1;
  // Host-path copy threads; 0 = MEMENTO_COPY_THREADS, else 4. Unit: threads.
  int copy_threads = 0;
  // Bytes per copy task on the host path (default 8 MiB).
  size_t copy_chunk_bytes = size_t{8} << 20;
  // How long Connect() retries while the agent's socket is not there yet (default 30 s).
  int connect_timeout_ms = 30000;
  // How long FinishRegistration() waits for the other ranks of the job (default 10 min).
  int registration_timeout_ms = 600000;
  // How long a capture waits for a free slot (the agents still agreeing on the previous version)
  // before it fails (default 10 min).
  int slot_timeout_ms = 600000;
  // CUDA stream (a cudaStream_t) that produces the registered device tensors; captures are
  // ordered after the work enqueued on it so far. nullptr = the legacy default stream.
  void* cuda_stream = nullptr;
  // "host:port" of memento-run's heartbeat listener (core/heartbeat.h); "" = MEMENTO_HEARTBEAT,
  // and no heartbeats when that is unset too.
  std::string heartbeat;
};

// Where a registered buffer lives.
enum class MemoryKind : int32_t { kHost = 0, kCuda = 1 };

// A version as the agent sees it.
struct VersionInfo {
  int64_t step = 0;
  std::string state;  // "capturing", "locally_complete", "globally_complete"
  int32_t captured_ranks = 0;  // local ranks of this node that captured it
  int32_t local_ranks = 0;     // local ranks of this node
  bool persisted = false;      // a committed checkpoint of it is in storage
  std::string flush_error;     // why its last flush failed, if it did
  bool is_protected = false;   // erasure-coded across the node's parity group
};

struct RestoreResult {
  int64_t step = -1;                  // the version restored
  std::vector<std::string> refused;   // newer versions refused, each with the reason (CRC mismatch…)
  std::string source;                 // "memory", or the checkpoint directory it came from
};

// Statistics of the last completed capture, for benchmarks and logs.
struct CaptureStats {
  int64_t step = -1;
  uint64_t bytes = 0;
  double snapshot_call_seconds = 0;   // time inside Snapshot()
  double wait_seconds = 0;            // time WaitUntilSafeToUpdate() blocked
  double copy_seconds = 0;            // from Snapshot() until the last byte landed in the slot
};

inline constexpr int64_t kLatestStep = -1;

class Client {
 public:
  // Connects and performs the handshake (job id, token, rank, local rank, world size).
  static Result<std::unique_ptr<Client>> Connect(ClientOptions options = {});
  virtual ~Client() = default;

  // Declares a tensor: `data` holds spec.local_numel elements of `dtype`, in host memory or on
  // CUDA device `cuda_device`. The buffer must stay valid for the life of the client; its
  // contents are read by Snapshot() and written by Restore().
  virtual Status RegisterTensor(const std::string& name, void* data, DType dtype, const ShardSpec& spec,
                                MemoryKind where = MemoryKind::kHost, int cuda_device = 0) = 0;
  // The same, with the buffer's size in bytes, which the agent checks against the spec.
  virtual Status RegisterTensor(const std::string& name, void* data, size_t buffer_bytes, DType dtype,
                                const ShardSpec& spec, MemoryKind where = MemoryKind::kHost,
                                int cuda_device = 0) = 0;
  // Declares an opaque blob (RNG state, data-loader position): `*size` bytes at `data` are
  // captured; Restore() writes the saved bytes and sets `*size`. At most `capacity` bytes.
  virtual Status RegisterBlob(const std::string& name, void* data, size_t capacity, size_t* size) = 0;
  // Sends the registrations to the agent, maps the slots, and waits until every rank of the job
  // has registered. Collective over the job's ranks. Called implicitly by the first Snapshot()
  // or Restore().
  virtual Status FinishRegistration() = 0;

  // Starts capturing the registered state as version `step` and returns at once.
  virtual Status Snapshot(int64_t step) = 0;
  // Blocks while copies of the last Snapshot() are in flight and returns the capture's error, if
  // it failed. The rank's slot is then reported captured in the background (before any later
  // capture begins); an error of that report is returned by the next Snapshot().
  virtual Status WaitUntilSafeToUpdate() = 0;

  // Fills the registered buffers and blobs from version `step`, or the newest globally complete
  // version. Every rank of a job restores the same version. NotFound when there is none.
  virtual Result<RestoreResult> Restore(int64_t step = kLatestStep) = 0;

  // Versions held by this node's agent, oldest first.
  virtual Result<std::vector<VersionInfo>> ListVersions() = 0;

  virtual CaptureStats last_capture() const = 0;
  virtual int rank() const = 0;
  virtual int node_id() const = 0;
};

}  // namespace memento
