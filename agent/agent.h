// memento-agent: the per-node daemon that owns the host copies of every rank's snapshots in
// named shared memory, keeps their catalog in RocksDB, checksums them, agrees with the other
// agents of the job (over a Communicator: MPI) which versions are globally complete, and serves
// the node's ranks over a Unix socket. See DESIGN.md §1–2.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "core/communicator.h"
#include "core/status.h"

namespace memento {

struct AgentOptions {
  // The job this agent serves (required); clients of other jobs are refused.
  std::string job_id;
  // The job's secret, checked in every client's handshake. Default "" = MEMENTO_JOB_TOKEN.
  std::string job_token;
  // This node's id; -1 = the agent's rank in its Communicator (MPI rank).
  int node_id = -1;
  // Unix socket path; "%n" becomes the node id. Default "" = /tmp/memento-<job>-node%n.sock.
  std::string socket_path;
  // Catalog directory (node-local disk); "%n" becomes the node id.
  // Default "" = /tmp/memento-<job>-node%n.catalog.
  std::string catalog_dir;
  // Written with the agent's pid once its socket serves; "%n" = node id. Removed on a clean stop.
  // Default "" (none). memento-run uses it to find the agent of a node.
  std::string pid_file;
  // Versions kept per rank (R slots each). 0 = 3: the newest restorable version, the newest
  // capture while its checksum and agreement run, and the next capture; 4 when flushing (one more
  // held by a flush); one more with erasure coding (the newest protected version stays while a
  // newer one is encoded).
  int slots_per_rank = 0;
  // Most bytes of slots this agent may create; 0 = no budget beyond what /dev/shm holds.
  uint64_t memory_budget_bytes = 0;
  // Threads computing and verifying CRC-64; 0 = three quarters of the node's CPUs, at least 4 (default).
  int crc_threads = 0;
  // Bytes per CRC chunk: the unit of parallel checksumming (default 64 MiB).
  uint64_t crc_chunk_bytes = uint64_t{64} << 20;
  // Interval between agreement rounds with the other agents, milliseconds (default 2).
  int tick_ms = 2;

  // ---- lazy flush to storage (DESIGN §2 step 6) ----
  // Root of persisted checkpoints (<root>/<job>/step-<N>/); "" = no flushing, no restore from storage.
  std::string storage_root;
  // A checkpoint to resume from when neither memory nor storage_root holds a newer version: a
  // universal checkpoint directory or a committed native one (any job, any layout: loading
  // reshards onto the registered layout). Needs storage_root. Default "" (none).
  std::string restore_from;
  // Flush only versions whose step is a multiple of this; 0 or 1 = any (default 0).
  int flush_every = 0;
  // Minimum seconds between the starts of two flushes (default 0).
  double flush_interval_s = 0;
  // Write-rate cap per agent, MB/s (10^6 bytes); 0 = unlimited (default).
  double flush_bandwidth_mbps = 0;
  // Bytes the flusher hands to storage at a time; between pieces it lets captures go first
  // (default 1 MiB: a capture waits for at most one piece in flight and one queued).
  uint64_t flush_piece_bytes = uint64_t{1} << 20;
  // Committed checkpoints kept; older ones are removed after each commit (default 3).
  int keep_persisted = 3;
  // Seconds before retrying a failed flush (doubles up to 60; default 1).
  double flush_retry_s = 1;
  // Test hook: a FaultInjectionFileSystem spec (core/file_system.h) for all storage I/O.
  std::string inject_fs;

  // ---- erasure coding across nodes (DESIGN §5) ----
  // "none", "replicate:R", "xor" or "rs:M" (default none).
  std::string ec = "none";
  // Agents per parity group; 0 = all agents of the job form one group (default 0).
  int group_size = 0;
  // How parity is computed: "holders" (segments are sent to the parity holders, which compute
  // their rows) or "partial" (each node encodes its own segments, an XOR reduce-scatter combines
  // them). Default "holders": 1.7–3.1x faster in `memento-bench erasure` (docs/PERFORMANCE.md).
  std::string ec_encode = "holders";
  // Optional file of "<node_id> <domain>" lines: groups spread over domains (racks, switches).
  std::string topology;
  // Node id per agent position (MPI rank), e.g. a replacement node taking a lost node's place;
  // empty = node_id, or the position.
  std::vector<int> node_ids;
};

// Runs the agent until `stop` becomes true in any agent of the job (all agents stop in the same
// round). Returns the error that ended it, if any.
Status RunAgent(AgentOptions options, Communicator* comm, const std::atomic<bool>* stop);

// Shared-memory names of node `node_id` of `job_id` start with this.
std::string ShmPrefix(const std::string& job_id, int node_id);

}  // namespace memento
