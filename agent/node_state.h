// The agent's state machine: ranks and their slots, versions and their states, the job's epochs
// (one per start of the training job) and the agreement rounds with the other agents.
// Thread-safe: connection threads call the client operations, the coordinator thread calls
// MakeTick/ApplyTick; all state is guarded by mu_.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <string>
#include <vector>

#include "agent/agent.h"
#include "agent/catalog.h"
#include "agent/flusher.h"
#include "agent/parity_group.h"
#include "core/shared_memory.h"
#include "core/status.h"
#include "core/thread_pool.h"
#include "proto/memento.pb.h"

namespace memento {

// What one connected rank told the agent.
struct Session {
  bool hello_done = false;
  int32_t rank = -1;
  int32_t local_rank = -1;
  int32_t world_size = 0;
  bool registered = false;
  uint64_t registration_serial = 0;  // which registration round this session belongs to
};

// The checks of client requests that need no agent state: NodeState runs them first, and the fuzz
// target tests/fuzz/fuzz_agent_request.cc drives them directly.
// The handshake: the protocol version, the job and token of `options`, 0 <= rank < world_size and
// local_rank >= 0. FailedPrecondition, PermissionDenied or InvalidArgument naming the rank.
Status CheckHello(const proto::Hello& hello, const AgentOptions& options);
// A registration checked (unique non-empty names, dtypes, specs, buffer sizes that match them, blob
// capacities) and laid out in one slot: the tensors, then the blobs (an 8-byte length, then the
// capacity), each at a 4 KiB-aligned offset; slot_bytes is at least 4 KiB. The record's rank,
// local rank and world size are the session's.
Result<proto::RankRecord> LayOutSlot(const Session& session, const proto::RegisterRequest& req);

// One agent's contribution to an agreement round: plain bytes, identical layout on every agent.
struct TickPayload {
  static constexpr int kMaxListed = 32;
  static constexpr int kReasonBytes = 384;
  int32_t node_id = -1;
  int32_t phase = 0;        // 0 = epoch open, 1 = waiting for registrations, 2 = verified
  int32_t registered = 0;   // ranks registered for the next epoch on this node
  int32_t world_size = 0;   // the world size those ranks declared (0 = none)
  uint64_t incarnation = 0;
  int32_t stop = 0;
  int32_t n_local = 0;
  int64_t local_complete[kMaxListed] = {};  // locally complete, not yet globally complete steps
  int32_t n_valid = 0;
  int64_t valid[kMaxListed] = {};           // phase 2: steps this node holds intact for every rank
  char reason[kReasonBytes] = {};           // phase 2: why the newest refused step was refused
  // Storage (phase 2): committed checkpoints this node sees, and those it failed to load.
  int32_t n_persisted = 0;
  int64_t persisted[kMaxListed] = {};
  int32_t n_failed_load = 0;
  int64_t failed_load[kMaxListed] = {};
  // Flush (epoch open): the coordinator's order, and this node's progress on its current flush.
  int64_t flush_order = -1;   // coordinator only: the step every agent flushes now
  int64_t flush_step = -1;    // the step flush_state refers to
  int32_t flush_state = 0;    // Flusher::State
  // Erasure coding.
  uint64_t data_bytes = 0;    // phase 2: bytes of this node's registered slots, all ranks
  int32_t n_protected = 0;    // phase 2: protected versions held intact here, data and parity
  int64_t protected_valid[kMaxListed] = {};
  int64_t encode_order = -1;  // coordinator only: the step every agent encodes now
  int64_t protected_step = -1;  // coordinator only: the step every group finished encoding
  int64_t encode_step = -1;   // the step encode_state refers to
  int32_t encode_state = 0;   // 0 idle, 1 encoding, 2 done, 3 failed
  int64_t newest_protected = -1;  // the newest version this node has recorded protected
  // In-memory resharding (phase 2): the retired layout this node holds and its intact steps; the
  // pending ranks that registered a CUDA tensor.
  int32_t retired_world = 0;
  int32_t retired_ranks = 0;
  int32_t n_retired = 0;
  int64_t retired[kMaxListed] = {};
  int32_t cuda_registered = 0;
  // The NCCL unique id of this incarnation, once rank 0 has sent it to its agent.
  uint64_t nccl_id_incarnation = 0;
  int32_t nccl_id_bytes = 0;
  char nccl_id[128] = {};
  // Whether this node ever saw a version of the job globally complete or a checkpoint committed.
  int32_t saved = 0;
};

class NodeState {
 public:
  // `flusher` is null when the agent has no storage. The agent at index 0 of the agreement rounds
  // (`coordinator`) orders flushes and commits manifests.
  // `group` is null without erasure coding.
  NodeState(const AgentOptions& options, int node_id, Catalog* catalog, Flusher* flusher, bool coordinator,
            ParityGroup* group = nullptr);
  ~NodeState();

  // Loads the catalog and re-attaches to surviving slots. Versions left capturing are dropped;
  // complete ones are re-verified when the next epoch opens.
  Status Recover();

  // ---- client operations (connection threads) ----
  Result<proto::HelloReply> Hello(Session* session, const proto::Hello& hello);
  Result<proto::RegisterReply> Register(Session* session, const proto::RegisterRequest& req);
  Result<proto::AwaitEpochReply> AwaitEpoch(Session* session, int timeout_ms);
  Result<proto::BeginCaptureReply> BeginCapture(Session* session, int64_t step, int timeout_ms);
  Status Captured(Session* session, int64_t step);
  Result<proto::RestoreReply> Restore(Session* session, int64_t step);
  // The NCCL unique id of this job start for in-memory resharding: rank 0 passes `id`, every rank
  // waits up to timeout_ms for its agent to learn it from the agreement rounds.
  Result<proto::NcclIdReply> NcclId(Session* session, const std::string& id, int timeout_ms);
  proto::ListVersionsReply ListVersions();
  // Ranks of this node copying into a slot right now (between BeginCapture and Captured).
  int captures_in_flight() const { return captures_in_flight_.load(std::memory_order_relaxed); }

  // ---- agreement rounds (coordinator thread) ----
  TickPayload MakeTick(bool stop);
  // Applies a round's results; every agent sees the same `all` and makes the same decisions.
  // Returns true when the job's agents agreed to stop.
  bool ApplyTick(const std::vector<TickPayload>& all);

 private:
  struct RankSlots {
    proto::RankRecord record;
    // shared: background CRC jobs keep a slot mapped while they read it
    std::vector<std::shared_ptr<SharedMemory>> slots;  // null: released (a retired slot with no version)
    size_t held() const {
      size_t n = 0;
      for (const auto& s : slots) n += s != nullptr;
      return n;
    }
  };

  Status CheckSessionInEpoch(const Session& s) const;  // REQUIRES(mu_)
  Result<int> ChooseSlot(int64_t step, std::string* why_none);  // REQUIRES(mu_)
  Status DropVersion(int64_t step);                    // REQUIRES(mu_)
  std::string EncoderStateLocked() const;  // for logs; caller holds mu_
  int64_t NewestProtected() const;                     // REQUIRES(mu_); -1 without erasure coding
  int64_t NewestGlobal() const;                        // REQUIRES(mu_)
  // Checks every region CRC of `rank` in version `v`; DataLoss naming rank, tensor and step.
  Status VerifyRank(const proto::VersionRecord& v, const RankSlots& rs);
  void VerifyForEpoch();                               // REQUIRES(mu_)
  void OpenEpoch(const std::vector<TickPayload>& all); // REQUIRES(mu_)
  void OnCrcDone(int64_t step, uint64_t incarnation, int32_t slot, proto::RankCapture capture);
  // Loads committed checkpoint `step` into a free slot for every pending rank.
  Status LoadFromStorage(int64_t step);                // REQUIRES(mu_)
  void FlushRound(const std::vector<TickPayload>& all); // REQUIRES(mu_)
  // Erasure coding: encoding ordered by the coordinator, rebuild at job start.
  void EncodeRound(const std::vector<TickPayload>& all); // REQUIRES(mu_)
  void StartEncode(int64_t step);                        // REQUIRES(mu_)
  Status EnsureParitySlots(uint64_t padded);             // REQUIRES(mu_)
  bool VerifyParity(const proto::VersionRecord& v);      // REQUIRES(mu_)
  // Picks the newest version a rebuild can bring back everywhere; false when none.
  bool PlanRebuild(const std::vector<TickPayload>& all, int64_t memory_point); // REQUIRES(mu_)
  void RebuildRound(const std::vector<TickPayload>& all); // REQUIRES(mu_)
  uint64_t GroupPadded(const std::vector<TickPayload>& all) const;
  NodeData DataOf(int slot, const std::set<int32_t>& ranks);  // REQUIRES(mu_)
  std::vector<proto::RegionCrc> RegionCrcs(const proto::RankRecord& layout, const uint8_t* base);
  void MaybeLocallyComplete(proto::VersionRecord* v);  // REQUIRES(mu_)
  // A capturing version whose `expected` ranks all captured it, some perhaps only acknowledged
  // (CRCs still computing, or lost with a dead agent): computes those CRCs from the slots, marks
  // it locally complete and records it. Returns whether it did. REQUIRES(mu_) once serving.
  bool ChecksumAcked(proto::VersionRecord* v, const std::set<int32_t>& expected);
  // Names for `rank`'s new slots (those after the spares in `reuse`), reserved in names_in_flight_.
  std::vector<std::string> SlotNamesFor(int32_t rank,
                                        const std::vector<std::shared_ptr<SharedMemory>>& reuse);  // REQUIRES(mu_)
  // Makes the slots of `rs->record`: first from `reuse` (a retired layout's spares, resized), then
  // new segments of `names`. Touches no shared state: runs without mu_.
  Status MakeSlots(RankSlots* rs, std::vector<std::shared_ptr<SharedMemory>> reuse,
                   const std::vector<std::string>& names);
  void ReleaseSlots(RankSlots* rs);
  // Whether a slot of a registered rank, of the retired layout or a spare has this name.
  bool SlotNameTaken(const std::string& name) const;  // REQUIRES(mu_)
  // Takes up to `n` spares for slots of `bytes` (same sizes first); their bytes leave
  // slot_bytes_in_use_ until the registration accounts the new slots.
  std::vector<std::shared_ptr<SharedMemory>> TakeSpares(int n, uint64_t bytes);  // REQUIRES(mu_)
  void ReleaseSpares(const std::string& why);  // REQUIRES(mu_)
  // In-memory resharding. A rank with CUDA tensors that registers a layout other than the saved
  // one (other shapes of its shards, or another world size) retires the node's versions: their
  // slots are kept, read-only, as the earlier layout, and the new layout's ranks get new slots.
  // When every node of the job holds its part of a retired version, newer than anything storage
  // holds, the ranks reshard it among themselves over NCCL (snapshot/memory_reshard.h) instead
  // of loading a checkpoint. The retired layout is dropped once a version of the new layout is
  // globally complete. `keep` are ranks of this registration round that kept their slots: the
  // retired layout gets copies of them.
  Status RetireLayout(const std::set<int32_t>& keep);  // REQUIRES(mu_)
  void DropRetired(const std::string& why);            // REQUIRES(mu_)
  Status PersistRetired();                             // REQUIRES(mu_)
  Status RecoverRetired();                             // REQUIRES(mu_)
  bool RetiredHoldsName(const std::string& name) const; // REQUIRES(mu_)
  // The newest retired step every node holds (and the earlier layout's world size), or -1 with
  // `why` saying what is missing.
  int64_t PlanMemoryReshard(const std::vector<TickPayload>& all, std::string* why, int32_t* world) const;

  const AgentOptions options_;
  const int node_id_;
  Catalog* catalog_;
  Flusher* flusher_;
  const bool coordinator_;
  ParityGroup* group_;
  std::unique_ptr<ThreadPool> crc_pool_;     // checksums of new captures (tasks take mu_ when done)
  std::unique_ptr<ThreadPool> verify_pool_;  // re-verification under mu_: its tasks never take mu_

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<int32_t, RankSlots> ranks_;                  // GUARDED_BY(mu_)
  std::map<int64_t, proto::VersionRecord> versions_;    // GUARDED_BY(mu_)
  uint64_t slot_bytes_in_use_ = 0;                      // GUARDED_BY(mu_)
  std::map<int32_t, int32_t> creating_;                 // GUARDED_BY(mu_) rank -> local rank, making its slots
  std::set<std::string> names_in_flight_;               // GUARDED_BY(mu_) their new segments' names
  // Epochs: the job is (re)started whenever its ranks register anew.
  bool epoch_open_ = false;                             // GUARDED_BY(mu_)
  int phase_ = 1;                                       // GUARDED_BY(mu_)
  uint64_t incarnation_ = 0;                            // GUARDED_BY(mu_)
  uint64_t registration_serial_ = 1;                    // GUARDED_BY(mu_)
  std::set<int32_t> pending_ranks_;                     // GUARDED_BY(mu_) registered, epoch not open
  int32_t pending_world_size_ = 0;                      // GUARDED_BY(mu_)
  std::set<int32_t> epoch_ranks_;                       // GUARDED_BY(mu_) local ranks of the open epoch
  std::vector<int64_t> valid_steps_;                    // GUARDED_BY(mu_) phase 2
  std::map<int64_t, std::string> refusal_reasons_;      // GUARDED_BY(mu_) phase 2, this node
  std::string first_reason_;                            // GUARDED_BY(mu_)
  int64_t restore_point_ = -1;                          // GUARDED_BY(mu_)
  std::vector<std::string> refused_;                    // GUARDED_BY(mu_) reported to restoring ranks
  int32_t job_registered_ = 0;                          // GUARDED_BY(mu_) job-wide, last round
  // Restore from storage (epoch start).
  int64_t load_target_ = -1;                            // GUARDED_BY(mu_) agreed checkpoint to load
  int64_t storage_loaded_ = -1;                         // GUARDED_BY(mu_) the last checkpoint agreed on
  int64_t load_fallback_ = -1;  // GUARDED_BY(mu_) the version every node held when load_target_ was agreed
  std::vector<int64_t> persisted_;                      // GUARDED_BY(mu_) committed steps seen, newest first
  std::map<int64_t, std::string> failed_loads_;         // GUARDED_BY(mu_) this epoch start
  // Flush.
  int64_t flush_current_ = -1;                          // GUARDED_BY(mu_) the version this node writes (pinned)
  int64_t flush_order_ = -1;                            // GUARDED_BY(mu_) coordinator: step ordered
  int64_t last_committed_ = -1;                         // GUARDED_BY(mu_) newest committed step
  double last_flush_start_ = -1e18;                     // GUARDED_BY(mu_) coordinator, seconds
  double retry_after_ = 0;                              // GUARDED_BY(mu_) coordinator, seconds
  double retry_backoff_ = 0;                            // GUARDED_BY(mu_) coordinator, seconds
  std::map<int64_t, std::string> flush_errors_;         // GUARDED_BY(mu_) this node's last error per step
  // Erasure coding.
  std::vector<std::shared_ptr<SharedMemory>> parity_;   // GUARDED_BY(mu_) one per slot index
  uint64_t padded_ = 0;                                 // GUARDED_BY(mu_) L of the parity slots
  std::thread encoder_;                                 // the running encode, if any
  std::atomic<int32_t> encode_state_{0};                // 0 idle, 1 encoding, 2 done, 3 failed
  std::atomic<int> captures_in_flight_{0};
  int64_t encode_current_ = -1;                         // GUARDED_BY(mu_) the version being encoded (pinned)
  std::vector<proto::RegionCrc> encode_crcs_;           // GUARDED_BY(mu_) parity CRCs of the last encode
  std::vector<std::string> encode_peers_;               // GUARDED_BY(mu_) members' CRC records, by index
  std::string encode_error_;                            // GUARDED_BY(mu_)
  int64_t encode_order_ = -1;                           // GUARDED_BY(mu_) coordinator
  int64_t protected_announce_ = -1;                     // GUARDED_BY(mu_) coordinator
  int64_t last_protected_ = -1;                         // GUARDED_BY(mu_)
  // The oldest of the nodes' newest protected versions, as the last round saw them: a node keeps
  // it until every node has recorded a newer one (the round that announces a protection may
  // complete on some nodes and not on others when a node dies in it).
  int64_t protected_everywhere_ = -1;                   // GUARDED_BY(mu_)
  std::set<int64_t> protected_here_;                    // GUARDED_BY(mu_) phase 2
  std::set<int64_t> rebuild_attempted_;                 // GUARDED_BY(mu_) this job start
  int64_t rebuild_target_ = -1;                         // GUARDED_BY(mu_)
  std::vector<int> rebuild_lost_;                       // GUARDED_BY(mu_) lost indices of this node's group
  std::vector<std::string> ec_refusals_;                // GUARDED_BY(mu_) this job start
  // In-memory resharding (RetireLayout).
  struct Retired {
    int32_t world_size = 0;
    std::map<int32_t, RankSlots> ranks;
    std::map<int64_t, proto::VersionRecord> versions;
    // The retired ranks' slots that held no version, kept (pages and all) for the new layout's
    // slots: a registration takes them instead of reserving new memory and the old being freed.
    // Those left when the new layout's epoch opens are released.
    std::vector<std::shared_ptr<SharedMemory>> spares;
    bool empty() const { return ranks.empty(); }
  };
  Retired retired_;                                     // GUARDED_BY(mu_)
  std::vector<int64_t> retired_valid_;                  // GUARDED_BY(mu_) phase 2, newest first
  int64_t reshard_point_ = -1;                          // GUARDED_BY(mu_) the retired step to reshard
  int32_t reshard_world_ = 0;                           // GUARDED_BY(mu_) its layout's world size
  std::string nccl_id_;                                 // GUARDED_BY(mu_)
  bool saved_ = false;      // this node saw a version globally complete or a checkpoint committed (catalog)
  bool job_saved_ = true;   // some node did, or storage or memory holds something (from the agreement)
  void MarkSaved();         // REQUIRES(mu_)
  uint64_t nccl_id_incarnation_ = 0;                    // GUARDED_BY(mu_)
};

}  // namespace memento
