// NodeState: slots, versions, epochs and agreement. See node_state.h for the contract.
//
// Invariants that keep a restorable version alive:
//  - the newest globally complete version's slot is never reused;
//  - a locally complete version waiting for the other agents is never reused (they may be about
//    to declare it globally complete);
//  - a version only becomes globally complete in an agreement round, which every agent applies
//    identically; and the restore point of an epoch is agreed the same way.
#include "agent/node_state.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <thread>

#include "core/crc.h"
#include "core/dtype.h"
#include "core/env.h"
#include "core/kill_point.h"
#include "core/log.h"
#include "proto/shard_convert.h"
#include "proto/version.h"

namespace memento {
namespace {

// MEMENTO_EVENT_LOG (tests, debugging): one line per event.
void LogEvent(int node_id, int64_t step, const char* event) {
  const std::string& path = Env().event_log;
  if (path.empty()) return;
  AppendLogLine(path, "attempt=" + std::to_string(Env().attempt) + " node=" + std::to_string(node_id) + " step=" +
                          std::to_string(step) + " " + event + "\n",
                "MEMENTO_EVENT_LOG");
}

constexpr uint64_t kSlotAlignment = 4096;
// A sanity bound on a registration's slot (2^62 bytes, far past any memory), which keeps its
// offsets from wrapping around.
constexpr uint64_t kMaxSlotBytes = uint64_t{1} << 62;

uint64_t AlignUp(uint64_t x) { return (x + kSlotAlignment - 1) / kSlotAlignment * kSlotAlignment; }

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string StateName(proto::VersionState s) {
  switch (s) {
    case proto::VERSION_CAPTURING: return "capturing";
    case proto::VERSION_LOCALLY_COMPLETE: return "locally_complete";
    case proto::VERSION_GLOBALLY_COMPLETE: return "globally_complete";
    default: return "unknown";
  }
}

// Whether a rank registered tensors in GPU memory (TensorRecord.memory_kind 1).
bool HasCudaTensors(const proto::RankRecord& rec) {
  return std::any_of(rec.tensors().begin(), rec.tensors().end(),
                     [](const proto::TensorRecord& t) { return t.memory_kind() == 1; });
}

bool SameLayout(const proto::RankRecord& a, const proto::RankRecord& b) {
  if (a.tensors_size() != b.tensors_size() || a.blobs_size() != b.blobs_size()) return false;
  for (int i = 0; i < a.tensors_size(); ++i) {
    if (a.tensors(i).SerializeAsString() != b.tensors(i).SerializeAsString()) return false;
  }
  for (int i = 0; i < a.blobs_size(); ++i) {
    if (a.blobs(i).SerializeAsString() != b.blobs(i).SerializeAsString()) return false;
  }
  return a.slot_bytes() == b.slot_bytes();
}

// Which name differs first, for the error message.
std::string FirstLayoutDifference(const proto::RankRecord& saved, const proto::RankRecord& now) {
  std::map<std::string, std::string> s, n;
  for (const auto& t : saved.tensors()) s[t.name()] = t.SerializeAsString();
  for (const auto& t : now.tensors()) n[t.name()] = t.SerializeAsString();
  for (const auto& b : saved.blobs()) s["blob " + b.name()] = b.SerializeAsString();
  for (const auto& b : now.blobs()) n["blob " + b.name()] = b.SerializeAsString();
  for (const auto& [name, v] : s) {
    auto it = n.find(name);
    if (it == n.end()) return "'" + name + "' was saved but is not registered now";
    if (it->second != v) return "'" + name + "' differs from the saved one (dtype, shape, spec or size)";
  }
  for (const auto& [name, v] : n) {
    if (!s.count(name)) return "'" + name + "' is registered now but was not saved";
  }
  return "the layout differs";
}

// A new version record of this incarnation.
proto::VersionRecord NewVersion(int64_t step, int32_t slot, proto::VersionState state, uint64_t incarnation) {
  proto::VersionRecord v;
  v.set_step(step);
  v.set_slot_index(slot);
  v.set_state(state);
  v.set_incarnation(incarnation);
  v.set_created_unix_ms(NowUnixMs());
  return v;
}

// The CRC regions of a rank's slot (every tensor, and every blob with its length header), chunk
// CRCs zeroed for the caller to fill.
std::vector<proto::RegionCrc> RegionLayout(const proto::RankRecord& layout, uint64_t chunk) {
  std::vector<proto::RegionCrc> regions;
  auto add = [&](const std::string& name, uint64_t off, uint64_t bytes) {
    proto::RegionCrc r;
    r.set_name(name);
    r.set_offset(off);
    r.set_bytes(bytes);
    r.set_chunk_bytes(chunk);
    const uint64_t n = bytes == 0 ? 1 : (bytes + chunk - 1) / chunk;
    for (uint64_t i = 0; i < n; ++i) r.add_chunk_crcs(0);
    regions.push_back(std::move(r));
  };
  for (const auto& t : layout.tensors()) add(t.name(), t.slot_offset(), t.bytes());
  for (const auto& b : layout.blobs()) add(b.name(), b.slot_offset(), 8 + b.capacity());
  return regions;
}

bool ContainsRank(const proto::VersionRecord& v, int32_t rank) {
  for (const auto& c : v.captured()) {
    if (c.rank() == rank) return true;
  }
  return false;
}

// Whether `rank`'s capture of `v` was acknowledged but its CRCs are not in the record yet.
bool IsAcked(const proto::VersionRecord& v, int32_t rank) {
  return std::find(v.acked_ranks().begin(), v.acked_ranks().end(), rank) != v.acked_ranks().end();
}

void RemoveAcked(proto::VersionRecord* v, int32_t rank) {
  auto* acked = v->mutable_acked_ranks();
  acked->erase(std::remove(acked->begin(), acked->end(), rank), acked->end());
}

}  // namespace

std::string ShmPrefix(const std::string& job_id, int node_id) {
  return "/memento-" + job_id + "-n" + std::to_string(node_id);
}

NodeState::NodeState(const AgentOptions& options, int node_id, Catalog* catalog, Flusher* flusher, bool coordinator,
                     ParityGroup* group)
    : options_(options), node_id_(node_id), catalog_(catalog), flusher_(flusher), coordinator_(coordinator), group_(group),
      crc_pool_(std::make_unique<ThreadPool>(std::max(1, options.crc_threads), /*nice_increment=*/10)),
      verify_pool_(std::make_unique<ThreadPool>(std::max(1, options.crc_threads))) {}

NodeState::~NodeState() {
  if (encoder_.joinable()) encoder_.join();
  crc_pool_.reset();
  verify_pool_.reset();
}

std::vector<std::string> NodeState::SlotNamesFor(int32_t rank,
                                                const std::vector<std::shared_ptr<SharedMemory>>& reuse) {
  std::vector<std::string> names;
  auto taken = [&](const std::string& n) {
    return SlotNameTaken(n) || std::any_of(reuse.begin(), reuse.end(), [&](const auto& seg) { return seg->name() == n; });
  };
  for (int k = static_cast<int>(reuse.size()); k < options_.slots_per_rank; ++k) {
    const std::string base = ShmPrefix(options_.job_id, node_id_) + "-r" + std::to_string(rank) + "-s" + std::to_string(k);
    std::string name = base;
    // A retired layout keeps its segments (and spares carry their old names): the new one takes
    // the next free generation's names.
    for (int g = 1; taken(name); ++g) name = base + "-g" + std::to_string(g);
    names_in_flight_.insert(name);
    names.push_back(std::move(name));
  }
  return names;
}

Status NodeState::MakeSlots(RankSlots* rs, std::vector<std::shared_ptr<SharedMemory>> reuse,
                            const std::vector<std::string>& names) {
  const uint64_t bytes = rs->record.slot_bytes();
  rs->record.clear_slot_names();
  // A spare is resized in place: its pages are reserved already (and shrinking frees the tail).
  for (auto& seg : reuse) {
    Status resized = seg->Resize(bytes);
    if (!resized.ok()) {
      resized = resized.WithContext("rank " + std::to_string(rs->record.rank()) + ": reusing slot " +
                                    std::to_string(rs->slots.size()) + " of the retired layout");
      for (auto& left : reuse) {
        if (left != nullptr) SharedMemory::Unlink(left->name()).IgnoreError();
      }
      ReleaseSlots(rs);
      rs->record.clear_slot_names();
      return resized;
    }
    rs->record.add_slot_names(seg->name());
    rs->slots.push_back(std::move(seg));
  }
  const size_t first_new = rs->slots.size();
  for (const std::string& name : names) {
    if (SharedMemory::Exists(name)) SharedMemory::Unlink(name).IgnoreError();  // stale, not in the catalog
  }
  // Reserving a slot (posix_fallocate) zeroes its pages: the slots are reserved at once, one thread
  // each, which is what a rank's registration waits for.
  std::vector<std::future<Result<std::unique_ptr<SharedMemory>>>> making;
  for (const std::string& name : names) making.push_back(std::async(std::launch::async, SharedMemory::Create, name, bytes));
  std::vector<Result<std::unique_ptr<SharedMemory>>> made;
  for (auto& f : making) made.push_back(f.get());
  Status failed;
  for (size_t k = 0; k < names.size(); ++k) {
    if (!made[k].ok()) {
      if (failed.ok()) {
        failed = made[k].status().WithContext("rank " + std::to_string(rs->record.rank()) + ": creating slot " +
                                              std::to_string(first_new + k));
      }
      continue;
    }
    rs->record.add_slot_names(names[k]);
    rs->slots.push_back(std::move(made[k]).value());
  }
  if (!failed.ok()) {
    ReleaseSlots(rs);
    rs->record.clear_slot_names();
    return failed;
  }
  return Status::Ok();
}

void NodeState::ReleaseSlots(RankSlots* rs) {
  for (auto& seg : rs->slots) {
    if (seg != nullptr) SharedMemory::Unlink(seg->name()).IgnoreError();
  }
  rs->slots.clear();
}

Status NodeState::Recover() {
  std::lock_guard<std::mutex> lock(mu_);
  auto node = catalog_->GetNode();
  if (node.ok()) {
    if (node->job_id() != options_.job_id) {
      return FailedPrecondition("catalog " + catalog_->dir() + " belongs to job '" + node->job_id() +
                                "', not '" + options_.job_id + "'");
    }
    if (node->format_version() != kCatalogFormatVersion) {
      return FailedPrecondition("catalog " + catalog_->dir() + " has format version " +
                                std::to_string(node->format_version()) + "; this agent reads version " +
                                std::to_string(kCatalogFormatVersion));
    }
    if (node->slots_per_rank() != options_.slots_per_rank) {
      return FailedPrecondition("catalog " + catalog_->dir() + " was made with " +
                                std::to_string(node->slots_per_rank()) + " slots per rank; the agent was started with " +
                                std::to_string(options_.slots_per_rank));
    }
    incarnation_ = node->incarnation();
    saved_ = node->saved();
    if (group_ != nullptr && node->padded_length() > 0) {
      const uint64_t bytes = group_->ParityLength(node->padded_length());
      for (int k = 0; k < options_.slots_per_rank; ++k) {
        auto seg = SharedMemory::Open(ShmPrefix(options_.job_id, node_id_) + "-q" + std::to_string(k), bytes, true);
        if (!seg.ok()) {
          MEMENTO_LOG(kWarning) << "parity slot " << k << " did not survive: " << seg.status().message();
          parity_.clear();
          break;
        }
        parity_.push_back(std::move(seg).value());
      }
      if (!parity_.empty()) padded_ = node->padded_length();
    }
  } else if (node.status().code() != StatusCode::kNotFound) {
    return node.status();
  }
  proto::NodeRecord rec;
  rec.set_format_version(kCatalogFormatVersion);
  rec.set_job_id(options_.job_id);
  rec.set_node_id(node_id_);
  rec.set_shm_prefix(ShmPrefix(options_.job_id, node_id_));
  rec.set_slots_per_rank(options_.slots_per_rank);
  rec.set_incarnation(incarnation_);
  rec.set_padded_length(padded_);
  MEMENTO_RETURN_IF_ERROR(catalog_->PutNode(rec));

  MEMENTO_ASSIGN_OR_RETURN(auto ranks, catalog_->ListRanks());
  MEMENTO_ASSIGN_OR_RETURN(auto versions, catalog_->ListVersions());
  std::set<int32_t> lost_ranks;
  for (auto& r : ranks) {
    RankSlots rs;
    rs.record = r;
    // A damaged layout would have the agent read (CRCs) and write (loads) outside the slots.
    Status layout = CheckRankLayout(r);
    bool intact = layout.ok();
    if (!intact) {
      MEMENTO_LOG(kWarning) << layout.message() << "; its versions are lost on this node";
    }
    for (const std::string& name : r.slot_names()) {
      if (!intact) break;
      auto seg = SharedMemory::Open(name, r.slot_bytes(), /*writable=*/true);
      if (!seg.ok()) {
        MEMENTO_LOG(kWarning) << "rank " << r.rank() << ": slot " << name << " did not survive ("
                              << seg.status().ToString() << "); its versions are lost on this node";
        intact = false;
        break;
      }
      rs.slots.push_back(std::move(seg).value());
    }
    if (!intact) {
      ReleaseSlots(&rs);
      lost_ranks.insert(r.rank());
      MEMENTO_RETURN_IF_ERROR(catalog_->DeleteRank(r.rank()));
      continue;
    }
    slot_bytes_in_use_ += r.slot_bytes() * r.slot_names_size();
    ranks_.emplace(r.rank(), std::move(rs));
  }
  int kept = 0;
  std::set<int32_t> local_ranks;
  for (const auto& [r, rs] : ranks_) local_ranks.insert(r);
  for (auto& v : versions) {
    bool lost = false;
    for (const auto& c : v.captured()) lost |= lost_ranks.count(c.rank()) > 0;
    for (int32_t r : v.acked_ranks()) lost |= lost_ranks.count(r) > 0;
    // A damaged record: every use of its slot index would address outside the ranks' slots.
    lost |= v.slot_index() < 0 || v.slot_index() >= options_.slots_per_rank;
    if (v.state() == proto::VERSION_CAPTURING && !lost && ChecksumAcked(&v, local_ranks)) {
      MEMENTO_LOG(kInfo) << "version " << v.step() << ": every local rank's capture was acknowledged before the "
                         << "agent stopped; its CRCs were completed from the slots";
    }
    if (v.state() == proto::VERSION_CAPTURING || lost) {
      MEMENTO_LOG(kInfo) << "dropping " << (lost ? "lost" : "torn") << " version " << v.step();
      MEMENTO_RETURN_IF_ERROR(catalog_->DeleteVersion(v.step()));
      continue;
    }
    versions_.emplace(v.step(), v);
    ++kept;
  }
  MEMENTO_RETURN_IF_ERROR(RecoverRetired());
  if (flusher_ != nullptr) {
    if (coordinator_) MEMENTO_RETURN_IF_ERROR(flusher_->RemovePartial());
    auto committed = flusher_->CommittedSteps(1);
    if (!committed.empty()) last_committed_ = committed[0];
  }
  MEMENTO_LOG(kInfo) << "catalog " << catalog_->dir() << ": " << ranks_.size() << " ranks, " << kept
                     << " complete versions re-attached (incarnation " << incarnation_ << ")";
  return Status::Ok();
}

// ---- client operations -----------------------------------------------------------------------

Status CheckHello(const proto::Hello& h, const AgentOptions& options) {
  const std::string who = "rank " + std::to_string(h.rank());
  if (h.protocol_version() != kAgentProtocolVersion) {
    return FailedPrecondition(who + ": client speaks agent protocol version " + std::to_string(h.protocol_version()) +
                              " but this agent speaks version " + std::to_string(kAgentProtocolVersion) +
                              " (client library " + h.library_version() + ", agent " + kLibraryVersion + ")");
  }
  if (h.job_id() != options.job_id) {
    return PermissionDenied(who + ": client of job '" + h.job_id() + "' refused by the agent of job '" +
                            options.job_id + "'");
  }
  if (h.job_token() != options.job_token) {
    return PermissionDenied(who + ": wrong job token for job '" + options.job_id + "'");
  }
  if (h.world_size() <= 0 || h.rank() < 0 || h.rank() >= h.world_size()) {
    return InvalidArgument(who + ": rank must be in [0, world_size) and world_size > 0 (got world_size " +
                           std::to_string(h.world_size()) + ")");
  }
  if (h.local_rank() < 0) return InvalidArgument(who + ": local_rank must be >= 0");
  return Status::Ok();
}

Result<proto::RankRecord> LayOutSlot(const Session& session, const proto::RegisterRequest& req) {
  const std::string who = "rank " + std::to_string(session.rank);
  proto::RankRecord rec;
  rec.set_rank(session.rank);
  rec.set_local_rank(session.local_rank);
  rec.set_world_size(session.world_size);
  std::set<std::string> names;
  // offset <= kMaxSlotBytes throughout: the sums below cannot wrap around.
  uint64_t offset = 0;
  const std::string too_large = "the slot would exceed " + std::to_string(kMaxSlotBytes) + " bytes";
  for (const auto& t : req.tensors()) {
    if (t.name().empty()) return InvalidArgument(who + ": a tensor has an empty name");
    if (!names.insert(t.name()).second) {
      return AlreadyExists(who + ": tensor '" + t.name() + "' is registered twice");
    }
    auto dtype = DTypeFromInt(t.dtype());
    if (!dtype.ok()) return InvalidArgument(who + ": tensor '" + t.name() + "': " + dtype.status().message());
    auto spec = FromProto(t.spec());
    if (!spec.ok()) return InvalidArgument(who + ": tensor '" + t.name() + "': " + spec.status().message());
    Status valid = spec->Validate();
    if (!valid.ok()) return InvalidArgument(who + ": tensor '" + t.name() + "': " + valid.message());
    uint64_t need = 0;
    if (__builtin_mul_overflow(static_cast<uint64_t>(spec->local_numel), DTypeSize(*dtype), &need)) {
      return InvalidArgument(who + ": tensor '" + t.name() + "': " + std::to_string(spec->local_numel) + " elements of " +
                             std::string(DTypeName(*dtype)) + " are more bytes than 64 bits can count");
    }
    if (t.bytes() != need) {
      return InvalidArgument(who + ": tensor '" + t.name() + "': buffer of " + std::to_string(t.bytes()) +
                             " bytes does not match its spec: " + std::to_string(spec->local_numel) +
                             " elements of " + std::string(DTypeName(*dtype)) + " need " + std::to_string(need) +
                             " bytes");
    }
    if (t.bytes() > kMaxSlotBytes - offset) return InvalidArgument(who + ": tensor '" + t.name() + "': " + too_large);
    proto::TensorRecord* out = rec.add_tensors();
    *out = t;
    out->set_slot_offset(offset);
    offset = AlignUp(offset + t.bytes());
  }
  for (const auto& b : req.blobs()) {
    if (b.name().empty()) return InvalidArgument(who + ": a blob has an empty name");
    if (!names.insert(b.name()).second) return AlreadyExists(who + ": blob '" + b.name() + "' is registered twice");
    if (b.capacity() == 0) return InvalidArgument(who + ": blob '" + b.name() + "' has capacity 0");
    if (offset + 8 > kMaxSlotBytes || b.capacity() > kMaxSlotBytes - offset - 8) {
      return InvalidArgument(who + ": blob '" + b.name() + "': " + too_large);
    }
    proto::BlobRecord* out = rec.add_blobs();
    *out = b;
    out->set_slot_offset(offset);
    offset = AlignUp(offset + 8 + b.capacity());
  }
  rec.set_slot_bytes(std::max<uint64_t>(offset, kSlotAlignment));
  return rec;
}

Result<proto::HelloReply> NodeState::Hello(Session* session, const proto::Hello& h) {
  MEMENTO_RETURN_IF_ERROR(CheckHello(h, options_));
  session->hello_done = true;
  session->rank = h.rank();
  session->local_rank = h.local_rank();
  session->world_size = h.world_size();
  proto::HelloReply reply;
  reply.set_protocol_version(kAgentProtocolVersion);
  reply.set_node_id(node_id_);
  reply.set_agent_version(kLibraryVersion);
  // Versions of ranks with CUDA tensors: a restart in another layout reshards them over NCCL.
  // Whether the layout differs is known at the registration; the hint lets the set-up start sooner.
  // Only a hint: the handshake waits for the lock 0.2 s at most (not for an epoch's verification).
  std::unique_lock<std::mutex> lock(mu_, std::defer_lock);
  for (int i = 0; !lock.try_lock(); ++i) {
    if (i == 200) return reply;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const bool held = std::any_of(versions_.begin(), versions_.end(), [](const auto& v) {
    return v.second.state() == proto::VERSION_LOCALLY_COMPLETE || v.second.state() == proto::VERSION_GLOBALLY_COMPLETE;
  });
  const bool cuda = std::any_of(ranks_.begin(), ranks_.end(), [](const auto& r) { return HasCudaTensors(r.second.record); });
  reply.set_reshard_likely(!retired_.empty() || (held && cuda));
  return reply;
}

Result<proto::RegisterReply> NodeState::Register(Session* session, const proto::RegisterRequest& req) {
  const std::string who = "rank " + std::to_string(session->rank);
  if (!session->hello_done) return FailedPrecondition("register before hello");
  MEMENTO_ASSIGN_OR_RETURN(proto::RankRecord rec, LayOutSlot(*session, req));

  const auto t_lock = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  const double lock_wait = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_lock).count();
  if (lock_wait > 0.01) {
    MEMENTO_LOG(kDebug) << who << ": registration waited " << lock_wait << " s for the agent's lock";
  }
  // Another session of this rank is creating its slots (outside the lock): that one goes first.
  cv_.wait(lock, [&] { return !creating_.count(session->rank); });
  if (pending_world_size_ != 0 && pending_world_size_ != session->world_size) {
    return InvalidArgument(who + ": declares world size " + std::to_string(session->world_size) +
                           " but other ranks of this node declared " + std::to_string(pending_world_size_));
  }
  for (const auto& [r, rs] : ranks_) {
    if (r != session->rank && rs.record.local_rank() == session->local_rank && pending_ranks_.count(r)) {
      return InvalidArgument(who + ": local rank " + std::to_string(session->local_rank) +
                             " is already taken by rank " + std::to_string(r));
    }
  }
  for (const auto& [r, local] : creating_) {
    if (local == session->local_rank) {
      return InvalidArgument(who + ": local rank " + std::to_string(session->local_rank) +
                             " is already taken by rank " + std::to_string(r));
    }
  }
  auto it = ranks_.find(session->rank);
  const bool has_cuda = HasCudaTensors(rec);
  const bool other_world = it != ranks_.end() && it->second.record.world_size() != session->world_size;
  if (it != ranks_.end() && (!SameLayout(it->second.record, rec) || (has_cuda && other_world))) {
    // A new layout (other TP / DP / ZeRO degrees) cannot use versions held in memory in the old
    // one as they are. Ranks with CUDA tensors reshard them over NCCL: the versions are retired
    // (RetireLayout). Otherwise the new layout restores from storage, where loading reshards
    // (ucp_format/universal.h): the old layout's versions are dropped when storage holds them all;
    // one that only memory holds is refused (nothing saved is lost). While one is being flushed or
    // erasure-coded (its slots are in use), the registration is retryable.
    std::vector<int64_t> held, lost, busy;
    // What storage holds now (the flush that committed it may not have been accounted yet).
    int64_t committed = last_committed_;
    if (flusher_ != nullptr) {
      const std::vector<int64_t> steps = flusher_->CommittedSteps(1);
      if (!steps.empty()) committed = std::max(committed, steps[0]);
    }
    auto list = [](const std::vector<int64_t>& v) {
      std::string out;
      for (int64_t s : v) out += (out.empty() ? "" : ", ") + std::to_string(s);
      return out;
    };
    for (const auto& [step, v] : versions_) {
      if (v.state() == proto::VERSION_CAPTURING || !ContainsRank(v, session->rank)) continue;
      held.push_back(step);
      const bool durable = v.persisted() || step <= committed;
      if (step == encode_current_ || (step == flush_current_ && !durable)) busy.push_back(step);
      if (!durable) lost.push_back(step);
    }
    const std::string difference = SameLayout(it->second.record, rec)
                                       ? "world size " + std::to_string(session->world_size) + " instead of " +
                                             std::to_string(it->second.record.world_size())
                                       : FirstLayoutDifference(it->second.record, rec);
    if (busy.empty() && !held.empty() && has_cuda) {
      std::set<int32_t> keep;
      if (!epoch_open_) keep = pending_ranks_;  // registered in this round with their slots
      keep.erase(session->rank);
      MEMENTO_LOG(kInfo) << who << " registered a different layout (" << difference << "); retiring versions "
                         << list(held) << " of the earlier layout for in-memory resharding";
      const auto t_retire = std::chrono::steady_clock::now();
      MEMENTO_RETURN_IF_ERROR(RetireLayout(keep));
      MEMENTO_LOG(kDebug) << who << ": retired the earlier layout in "
                          << std::chrono::duration<double>(std::chrono::steady_clock::now() - t_retire).count()
                          << " s, " << retired_.spares.size() << " spare slots";
      it = ranks_.end();
    } else if (!lost.empty()) {
      // Nothing saved is dropped by a registration: the versions only memory holds restore in the
      // layout they were saved in.
      return FailedPrecondition(who + ": registration differs from the saved layout: " + difference + "; versions " + list(lost) +
                                " of the saved layout are only in this node's memory (newest in storage: " +
                                std::to_string(committed) +
                                "). Restart with the saved layout to restore them, or start the agents afresh "
                                "(a new catalog) to resume from storage in the new layout");
    }
    if (!busy.empty()) {
      return Unavailable(who + ": registration differs from the saved layout: " + difference + "; versions " + list(busy) +
                         " of the saved layout are being flushed or erasure-coded on this node; retry when done");
    }
    if (it != ranks_.end() && !held.empty()) {
      MEMENTO_LOG(kInfo) << who << " registered a different layout (" << difference << "); dropping versions " << list(held) << " held in the old layout: a new layout restores from storage";
      for (int64_t s : held) DropVersion(s).IgnoreError();
    }
    if (it != ranks_.end()) {
      slot_bytes_in_use_ -= it->second.record.slot_bytes() * it->second.slots.size();
      ReleaseSlots(&it->second);
      ranks_.erase(it);
      // Registered again below, once its new slots exist: until then (they are made outside the
      // lock) the rank is not one of this round's, whose slots the rebuilds and loads use.
      pending_ranks_.erase(session->rank);
      it = ranks_.end();
    }
  }
  if (it == ranks_.end()) {
    const uint64_t need = rec.slot_bytes() * static_cast<uint64_t>(options_.slots_per_rank);
    // The retired layout's empty slots become this rank's first: their memory is reserved already.
    std::vector<std::shared_ptr<SharedMemory>> reuse = TakeSpares(options_.slots_per_rank, rec.slot_bytes());
    uint64_t shm_need = 0;  // what /dev/shm must still give: new slots and grown spares
    for (int k = 0; k < options_.slots_per_rank; ++k) {
      const uint64_t have = k < static_cast<int>(reuse.size()) ? reuse[k]->size() : 0;
      shm_need += rec.slot_bytes() > have ? rec.slot_bytes() - have : 0;
    }
    auto give_back = [&] {
      for (auto& seg : reuse) slot_bytes_in_use_ += seg->size();
      retired_.spares.insert(retired_.spares.end(), reuse.begin(), reuse.end());
    };
    if (options_.memory_budget_bytes != 0 && slot_bytes_in_use_ + need > options_.memory_budget_bytes) {
      give_back();
      return ResourceExhausted(who + ": needs " + std::to_string(options_.slots_per_rank) + " slots of " +
                               FormatBytes(rec.slot_bytes()) + " = " + FormatBytes(need) +
                               ", but the agent's memory budget has " +
                               FormatBytes(options_.memory_budget_bytes - slot_bytes_in_use_) + " free (budget " +
                               FormatBytes(options_.memory_budget_bytes) + ", " + FormatBytes(slot_bytes_in_use_) +
                               " in use)");
    }
    const uint64_t shm_free = shm_need > 0 ? SharedMemoryFreeBytes() : 0;
    if (shm_free < shm_need) {
      give_back();
      return ResourceExhausted(who + ": needs " + FormatBytes(shm_need) + " of shared memory for " +
                               std::to_string(options_.slots_per_rank) + " slots, but /dev/shm has " +
                               FormatBytes(shm_free) + " free");
    }
    // The slots are made outside the lock (reserving them zeroes their pages: 0.4 s for 6 GiB on
    // an H200 host), so that the node's ranks make theirs at once; their bytes and names are
    // reserved first, and a second session of this rank waits (creating_).
    slot_bytes_in_use_ += need;
    creating_.emplace(session->rank, session->local_rank);
    const std::vector<std::string> names = SlotNamesFor(session->rank, reuse);
    RankSlots rs;
    rs.record = rec;
    const auto t_create = std::chrono::steady_clock::now();
    const size_t reused = reuse.size();
    lock.unlock();
    Status made = MakeSlots(&rs, std::move(reuse), names);
    lock.lock();
    for (const std::string& n : names) names_in_flight_.erase(n);
    creating_.erase(session->rank);
    cv_.notify_all();
    if (!made.ok()) {
      slot_bytes_in_use_ -= need;
      return made;
    }
    MEMENTO_LOG(kDebug) << who << ": " << options_.slots_per_rank << " slots of " << FormatBytes(rec.slot_bytes())
                        << " ready in "
                        << std::chrono::duration<double>(std::chrono::steady_clock::now() - t_create).count()
                        << " s (" << reused << " from the retired layout's spares)";
    it = ranks_.emplace(session->rank, std::move(rs)).first;
  }
  it->second.record.set_local_rank(session->local_rank);
  it->second.record.set_world_size(session->world_size);
  it->second.record.set_incarnation(incarnation_ + 1);
  MEMENTO_RETURN_IF_ERROR(catalog_->PutRank(it->second.record));

  // A registration starts the job's next epoch: the running one, if any, is over.
  if (epoch_open_) {
    MEMENTO_LOG(kInfo) << who << " registered: the job restarted; closing incarnation " << incarnation_;
    epoch_open_ = false;
    phase_ = 1;
    ++registration_serial_;
    pending_ranks_.clear();
    epoch_ranks_.clear();
    captures_in_flight_ = 0;  // captures of the old incarnation will never report
  }
  pending_ranks_.insert(session->rank);
  pending_world_size_ = session->world_size;
  session->registered = true;
  session->registration_serial = registration_serial_;
  cv_.notify_all();

  proto::RegisterReply reply;
  *reply.mutable_tensors() = it->second.record.tensors();
  *reply.mutable_blobs() = it->second.record.blobs();
  reply.set_slot_bytes(it->second.record.slot_bytes());
  *reply.mutable_slot_names() = it->second.record.slot_names();
  reply.set_reshard_candidate(!retired_.empty());
  return reply;
}

Status NodeState::CheckSessionInEpoch(const Session& s) const {
  const std::string who = "rank " + std::to_string(s.rank);
  if (!s.registered) return FailedPrecondition(who + ": not registered");
  if (s.registration_serial != registration_serial_) {
    return Aborted(who + ": this session was superseded by a newer registration of the job (the job restarted)");
  }
  if (!epoch_open_) return FailedPrecondition(who + ": registration not finished: waiting for the job's other ranks");
  return Status::Ok();
}

Result<proto::AwaitEpochReply> NodeState::AwaitEpoch(Session* session, int timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!session->registered) return FailedPrecondition("rank " + std::to_string(session->rank) + ": not registered");
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  bool ok = cv_.wait_until(lock, deadline, [&] {
    return session->registration_serial != registration_serial_ || epoch_open_;
  });
  if (session->registration_serial != registration_serial_) return CheckSessionInEpoch(*session);
  if (!ok) {
    return Timeout("rank " + std::to_string(session->rank) + ": waited " + std::to_string(timeout_ms) +
                   " ms for the job's ranks to register; " + std::to_string(job_registered_) + " of " +
                   std::to_string(session->world_size) + " have");
  }
  proto::AwaitEpochReply reply;
  reply.set_incarnation(incarnation_);
  reply.set_restore_point(std::max(restore_point_, reshard_point_));
  for (const auto& r : refused_) reply.add_refused(r);
  return reply;
}

int64_t NodeState::NewestGlobal() const {
  for (auto it = versions_.rbegin(); it != versions_.rend(); ++it) {
    if (it->second.state() == proto::VERSION_GLOBALLY_COMPLETE) return it->first;
  }
  return -1;
}

std::string NodeState::EncoderStateLocked() const {
  if (group_ == nullptr) return "none";
  static const char* const kStates[] = {"idle", "encoding", "done", "failed"};
  const int32_t st = encode_state_.load();
  return std::string(st >= 0 && st < 4 ? kStates[st] : "?") + ", current step " + std::to_string(encode_current_) +
         (coordinator_ ? ", order " + std::to_string(encode_order_) + ", announcing " + std::to_string(protected_announce_)
                       : std::string()) +
         ", last protected " + std::to_string(last_protected_);
}

void NodeState::MarkSaved() {
  if (saved_) return;
  saved_ = true;
  auto node = catalog_->GetNode();
  if (node.ok()) {
    node->set_saved(true);
    catalog_->PutNode(*node).IgnoreError();
  }
}

Status NodeState::DropVersion(int64_t step) {
  versions_.erase(step);
  return catalog_->DeleteVersion(step);
}

int64_t NodeState::NewestProtected() const {
  int64_t newest = -1;
  if (group_ == nullptr) return newest;
  for (const auto& [s, v] : versions_) {
    if (v.is_protected() && v.state() == proto::VERSION_GLOBALLY_COMPLETE) newest = std::max(newest, s);
  }
  return newest;
}

Result<int> NodeState::ChooseSlot(int64_t step, std::string* why_none) {
  const int64_t newest_global = NewestGlobal();
  std::vector<const proto::VersionRecord*> by_slot(options_.slots_per_rank, nullptr);
  for (const auto& [s, v] : versions_) {
    if (v.slot_index() >= 0 && v.slot_index() < options_.slots_per_rank) by_slot[v.slot_index()] = &v;
  }
  // With erasure coding, the newest protected version stays too: until a newer one is encoded, it
  // is the newest a lost node can be rebuilt to. So does the newest one every node has recorded
  // protected, while some node may not have recorded a newer one yet: a rebuild needs a version
  // that the surviving nodes all hold protected.
  const int64_t newest_protected = NewestProtected();
  const int64_t protected_everywhere = group_ != nullptr ? protected_everywhere_ : -1;
  // With storage, the newest version the flush policy admits stays until it is flushed or a newer
  // admitted one replaces it: else captures could recycle it while an older flush runs, and the
  // policy's "every N-th" version would never reach storage.
  int64_t flush_candidate = -1;
  if (flusher_ != nullptr) {
    for (auto it = versions_.rbegin(); it != versions_.rend(); ++it) {
      const int64_t s = it->first;
      if (s <= last_committed_) break;
      if (it->second.state() != proto::VERSION_GLOBALLY_COMPLETE || it->second.persisted()) continue;
      if (options_.flush_every > 1 && s % options_.flush_every != 0) continue;
      flush_candidate = s;
      break;
    }
  }
  int best = -1;
  int64_t best_step = INT64_MAX;
  why_none->clear();
  for (int k = 0; k < options_.slots_per_rank; ++k) {
    const proto::VersionRecord* v = by_slot[k];
    if (v == nullptr) return k;
    bool usable = v->state() == proto::VERSION_GLOBALLY_COMPLETE && v->step() != newest_global &&
                  v->step() != flush_current_ && v->step() != encode_current_ && v->step() != newest_protected &&
                  v->step() != protected_everywhere && v->step() != flush_candidate;
    if (!usable) {
      *why_none += (why_none->empty() ? "" : ", ") + std::string("slot ") + std::to_string(k) + " holds step " +
                   std::to_string(v->step()) + " (" + StateName(v->state()) +
                   (v->step() == newest_global ? ", newest restorable" : "") +
                   (v->step() == flush_current_ ? ", being flushed" : "") +
                   (v->step() == encode_current_ ? ", being erasure-coded" : "") +
                   (v->step() == newest_protected ? ", newest erasure-coded" : "") +
                   (v->step() == protected_everywhere && v->step() != newest_protected
                        ? ", newest erasure-coded on every node"
                        : "") +
                   (v->step() == flush_candidate ? ", next to flush" : "") + ")";
      continue;
    }
    if (v->step() < best_step) {
      best_step = v->step();
      best = k;
    }
  }
  (void)step;
  return best;
}

Result<proto::BeginCaptureReply> NodeState::BeginCapture(Session* session, int64_t step, int timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  MEMENTO_RETURN_IF_ERROR(CheckSessionInEpoch(*session));
  const std::string who = "rank " + std::to_string(session->rank);
  if (step < 0) return InvalidArgument(who + ": step must be >= 0, got " + std::to_string(step));
  const auto started = std::chrono::steady_clock::now();
  const auto deadline = started + std::chrono::milliseconds(timeout_ms);
  auto next_report = started + std::chrono::seconds(3);
  for (;;) {
    MEMENTO_RETURN_IF_ERROR(CheckSessionInEpoch(*session));
    auto it = versions_.find(step);
    if (it != versions_.end() && it->second.state() == proto::VERSION_CAPTURING &&
        it->second.incarnation() == incarnation_) {
      if (ContainsRank(it->second, session->rank)) {
        return FailedPrecondition(who + ": step " + std::to_string(step) + " was already captured by this rank");
      }
      proto::BeginCaptureReply reply;
      reply.set_slot_index(it->second.slot_index());
      ++captures_in_flight_;
      return reply;
    }
    // A step at or below versions this node already holds: the job went back in time (restored an
    // older version); the newer versions belong to an abandoned timeline.
    std::vector<int64_t> newer;
    for (const auto& [s, v] : versions_) {
      if (s >= step) newer.push_back(s);
    }
    for (int64_t s : newer) {
      MEMENTO_LOG(kInfo) << "step " << step << " captured again: dropping version " << s << " of the old timeline";
      MEMENTO_RETURN_IF_ERROR(DropVersion(s));
    }
    std::string why;
    MEMENTO_ASSIGN_OR_RETURN(int slot, ChooseSlot(step, &why));
    if (slot >= 0) {
      for (auto vit = versions_.begin(); vit != versions_.end(); ++vit) {
        if (vit->second.slot_index() == slot) {
          MEMENTO_RETURN_IF_ERROR(DropVersion(vit->first));
          break;
        }
      }
      proto::VersionRecord v = NewVersion(step, slot, proto::VERSION_CAPTURING, incarnation_);
      MEMENTO_RETURN_IF_ERROR(catalog_->PutVersion(v));
      versions_[step] = v;
      proto::BeginCaptureReply reply;
      reply.set_slot_index(slot);
      ++captures_in_flight_;
      return reply;
    }
    // A capture waits for a slot only while the encoder or the flusher holds the older versions:
    // a wait of seconds is worth a line in the agent's log (every 10 s), naming what holds them.
    const auto now = std::chrono::steady_clock::now();
    if (now >= next_report) {
      const auto waited_ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - started).count();
      MEMENTO_LOG(kWarning) << who << " has waited " << waited_ms << " ms for a slot for step " << step << " on node "
                            << node_id_ << ": " << why
                            << "; encoder: " << EncoderStateLocked() << "; newest restorable " << NewestGlobal();
      next_report = now + std::chrono::seconds(10);
    }
    if (cv_.wait_until(lock, std::min(deadline, next_report)) == std::cv_status::timeout &&
        std::chrono::steady_clock::now() >= deadline) {
      return Timeout(who + ": no free slot for step " + std::to_string(step) + " on node " + std::to_string(node_id_) +
                     " after " + std::to_string(timeout_ms) + " ms: " + why);
    }
  }
}

Status NodeState::Captured(Session* session, int64_t step) {
  std::vector<std::pair<const proto::TensorRecord*, const proto::BlobRecord*>> regions;
  std::shared_ptr<SharedMemory> segment;
  proto::RankRecord record;
  uint64_t incarnation = 0;
  int32_t slot = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    MEMENTO_RETURN_IF_ERROR(CheckSessionInEpoch(*session));
    const std::string who = "rank " + std::to_string(session->rank);
    auto it = versions_.find(step);
    if (it == versions_.end() || it->second.state() != proto::VERSION_CAPTURING) {
      return FailedPrecondition(who + ": captured step " + std::to_string(step) + " that is not being captured");
    }
    if (ContainsRank(it->second, session->rank) || IsAcked(it->second, session->rank)) {
      return FailedPrecondition(who + ": step " + std::to_string(step) + " reported captured twice");
    }
    auto rit = ranks_.find(session->rank);
    if (rit == ranks_.end()) return Internal(who + ": registered but has no slots");
    // Recorded before the reply: from here on the rank counts on this capture, so neither the
    // agent's death nor a new epoch may drop it while the CRCs below are still computing.
    it->second.add_acked_ranks(session->rank);
    MEMENTO_RETURN_IF_ERROR(catalog_->PutVersion(it->second, /*sync=*/false));
    if (captures_in_flight_ > 0) --captures_in_flight_;
    slot = it->second.slot_index();
    incarnation = it->second.incarnation();
    record = rit->second.record;
    segment = rit->second.slots.at(slot);
  }
  uint8_t* base = segment->data();
  // Checksum in the background: split every region into chunks over the CRC pool.
  struct Job {
    std::mutex mu;
    int remaining = 0;
    proto::RankCapture capture;
  };
  auto job = std::make_shared<Job>();
  job->capture.set_rank(record.rank());
  const uint64_t chunk = std::max<uint64_t>(options_.crc_chunk_bytes, 4096);
  for (auto& r : RegionLayout(record, chunk)) {
    job->remaining += r.chunk_crcs_size();
    *job->capture.add_crcs() = std::move(r);
  }
  if (job->remaining == 0) {
    OnCrcDone(step, incarnation, slot, job->capture);
    return Status::Ok();
  }
  for (int ri = 0; ri < job->capture.crcs_size(); ++ri) {
    const proto::RegionCrc& r = job->capture.crcs(ri);
    for (int ci = 0; ci < r.chunk_crcs_size(); ++ci) {
      const uint64_t begin = r.offset() + static_cast<uint64_t>(ci) * chunk;
      const uint64_t len = std::min<uint64_t>(chunk, r.offset() + r.bytes() - begin);
      crc_pool_->Submit([this, job, segment, base, ri, ci, begin, len, step, incarnation, slot] {
        KillPoint("agent.crc", job->capture.rank(), step);  // acknowledged, CRCs not yet recorded
        uint64_t crc = Crc64(base + begin, len);
        bool last = false;
        {
          std::lock_guard<std::mutex> l(job->mu);
          job->capture.mutable_crcs(ri)->set_chunk_crcs(ci, crc);
          last = --job->remaining == 0;
        }
        if (last) OnCrcDone(step, incarnation, slot, job->capture);
      });
    }
  }
  return Status::Ok();
}

void NodeState::OnCrcDone(int64_t step, uint64_t incarnation, int32_t slot, proto::RankCapture capture) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = versions_.find(step);
  if (it == versions_.end() || it->second.incarnation() != incarnation || it->second.slot_index() != slot ||
      it->second.state() != proto::VERSION_CAPTURING) {
    return;  // dropped meanwhile (the job restarted)
  }
  if (ContainsRank(it->second, capture.rank())) return;  // checksummed meanwhile by an epoch change
  RemoveAcked(&it->second, capture.rank());
  *it->second.add_captured() = std::move(capture);
  MaybeLocallyComplete(&it->second);
  Status st = catalog_->PutVersion(it->second);
  if (!st.ok()) {
    MEMENTO_LOG(kError) << "recording capture of step " << step << ": " << st.ToString();
  }
  cv_.notify_all();
}

bool NodeState::ChecksumAcked(proto::VersionRecord* v, const std::set<int32_t>& expected) {
  if (expected.empty()) return false;
  for (int32_t r : expected) {
    if (!ContainsRank(*v, r) && !IsAcked(*v, r)) return false;  // torn: that rank never finished
  }
  const std::vector<int32_t> acked(v->acked_ranks().begin(), v->acked_ranks().end());
  for (int32_t r : acked) {
    auto rit = ranks_.find(r);
    if (rit == ranks_.end() || v->slot_index() >= static_cast<int>(rit->second.slots.size())) return false;
    proto::RankCapture* cap = v->add_captured();
    cap->set_rank(r);
    std::vector<proto::RegionCrc> regions = RegionCrcs(rit->second.record, rit->second.slots[v->slot_index()]->data());
    for (auto& region : regions) *cap->add_crcs() = std::move(region);
    RemoveAcked(v, r);
  }
  for (int32_t r : expected) {
    if (!ContainsRank(*v, r)) return false;
  }
  v->set_state(proto::VERSION_LOCALLY_COMPLETE);
  Status st = catalog_->PutVersion(*v);
  if (!st.ok()) {
    MEMENTO_LOG(kError) << "recording the CRCs of step " << v->step() << ": " << st.ToString();
  }
  return true;
}

void NodeState::MaybeLocallyComplete(proto::VersionRecord* v) {
  // Between epochs the local ranks are not known yet (a late CRC of the old epoch must not make
  // a version complete without a rank that never captured it); VerifyForEpoch decides then.
  if (!epoch_open_ || epoch_ranks_.empty()) return;
  for (int32_t r : epoch_ranks_) {
    if (!ContainsRank(*v, r)) return;
  }
  v->set_state(proto::VERSION_LOCALLY_COMPLETE);
  MEMENTO_LOG(kDebug) << "step " << v->step() << " locally complete";
}

Result<proto::RestoreReply> NodeState::Restore(Session* session, int64_t step) {
  std::lock_guard<std::mutex> lock(mu_);
  MEMENTO_RETURN_IF_ERROR(CheckSessionInEpoch(*session));
  const std::string who = "rank " + std::to_string(session->rank);
  if (reshard_point_ >= 0 && (step < 0 ? reshard_point_ > NewestGlobal() : step == reshard_point_)) {
    // A node that holds no part of the earlier layout would take part as a target only (every node
    // of a job runs ranks, and each held some of the earlier layout unless its memory was lost, in
    // which case nothing is resharded: this is a safeguard).
    int32_t slot = -1;
    auto vit = retired_.versions.find(reshard_point_);
    if (vit != retired_.versions.end()) {
      slot = vit->second.slot_index();
    } else if (!retired_.empty()) {
      return Internal(who + ": the retired version " + std::to_string(reshard_point_) + " is gone");
    }
    proto::RestoreReply reply;
    reply.set_step(reshard_point_);
    reply.set_slot_index(-1);
    reply.set_source("memory (resharded from world size " + std::to_string(reshard_world_) + ")");
    for (const auto& r : refused_) reply.add_refused(r);
    proto::MemoryReshard* m = reply.mutable_memory_reshard();
    m->set_step(reshard_point_);
    m->set_slot_index(slot);
    m->set_old_world_size(reshard_world_);
    for (const auto& [r, rs] : retired_.ranks) *m->add_old_ranks() = rs.record;
    for (int32_t r : epoch_ranks_) m->add_new_ranks(r);
    return reply;
  }
  int64_t chosen = step;
  if (step < 0) {
    chosen = NewestGlobal();
    if (chosen < 0) {
      std::string msg = who + ": no globally complete version to restore on node " + std::to_string(node_id_);
      for (const auto& r : refused_) msg += "; " + r;
      if (!job_saved_) msg += "; " + std::string(kNothingSaved);
      return NotFound(msg);
    }
  }
  auto it = versions_.find(chosen);
  if (it == versions_.end() || it->second.state() != proto::VERSION_GLOBALLY_COMPLETE) {
    return NotFound(who + ": version " + std::to_string(chosen) + " is not a globally complete version on node " +
                    std::to_string(node_id_));
  }
  if (!ContainsRank(it->second, session->rank)) {
    return NotFound(who + ": version " + std::to_string(chosen) + " holds no data of this rank on node " +
                    std::to_string(node_id_));
  }
  proto::RestoreReply reply;
  reply.set_step(chosen);
  reply.set_slot_index(it->second.slot_index());
  reply.set_source(it->second.source().empty() ? "memory" : it->second.source());
  for (const auto& r : refused_) reply.add_refused(r);
  return reply;
}

proto::ListVersionsReply NodeState::ListVersions() {
  std::lock_guard<std::mutex> lock(mu_);
  proto::ListVersionsReply reply;
  for (const auto& [step, v] : versions_) {
    proto::VersionInfoProto* p = reply.add_versions();
    p->set_step(step);
    p->set_state(StateName(v.state()));
    p->set_captured_ranks(v.captured_size());
    p->set_local_ranks(static_cast<int32_t>(epoch_open_ ? epoch_ranks_.size() : pending_ranks_.size()));
    p->set_persisted(v.persisted());
    p->set_source(v.source());
    p->set_is_protected(v.is_protected());
    auto e = flush_errors_.find(step);
    if (e != flush_errors_.end()) p->set_flush_error(e->second);
  }
  return reply;
}

// ---- verification and agreement --------------------------------------------------------------

Status NodeState::VerifyRank(const proto::VersionRecord& v, const RankSlots& rs) {
  const proto::RankCapture* cap = nullptr;
  for (const auto& c : v.captured()) {
    if (c.rank() == rs.record.rank()) cap = &c;
  }
  if (cap == nullptr) {
    return NotFound("rank " + std::to_string(rs.record.rank()) + " has no data of step " + std::to_string(v.step()) +
                    " on node " + std::to_string(node_id_));
  }
  if (v.slot_index() < 0 || v.slot_index() >= static_cast<int>(rs.slots.size()) || rs.slots[v.slot_index()] == nullptr) {
    return DataLoss("step " + std::to_string(v.step()) + " names slot " + std::to_string(v.slot_index()) +
                    " which rank " + std::to_string(rs.record.rank()) + " does not have");
  }
  const uint8_t* base = rs.slots[v.slot_index()]->data();
  const uint64_t slot_bytes = rs.slots[v.slot_index()]->size();
  struct Check {
    const proto::RegionCrc* region;
    int chunk;
  };
  std::vector<Check> checks;
  for (const auto& r : cap->crcs()) {
    Status valid = CheckRegionCrc(r, slot_bytes);
    if (!valid.ok()) {
      return DataLoss("catalog record of rank " + std::to_string(rs.record.rank()) + " '" + r.name() + "' step " +
                      std::to_string(v.step()) + " lies outside its slot (" + valid.message() + ")");
    }
    for (int c = 0; c < r.chunk_crcs_size(); ++c) checks.push_back({&r, c});
  }
  std::vector<uint8_t> bad(checks.size(), 0);
  TaskGroup group;
  group.Add(static_cast<int>(checks.size()));
  for (size_t i = 0; i < checks.size(); ++i) {
    verify_pool_->Submit([&, i] {
      const proto::RegionCrc& r = *checks[i].region;
      const auto [begin, end] = RegionChunk(r, checks[i].chunk);
      bad[i] = Crc64(base + begin, end - begin) != r.chunk_crcs(checks[i].chunk);
      group.Done();
    });
  }
  group.Wait();
  for (size_t i = 0; i < checks.size(); ++i) {
    if (!bad[i]) continue;
    const proto::RegionCrc& r = *checks[i].region;
    const uint64_t begin = static_cast<uint64_t>(checks[i].chunk) * r.chunk_bytes();
    const uint64_t end = std::min<uint64_t>(begin + r.chunk_bytes(), r.bytes());
    return DataLoss("CRC mismatch in rank " + std::to_string(rs.record.rank()) + " tensor '" + r.name() + "' step " +
                    std::to_string(v.step()) + " (bytes " + std::to_string(begin) + ".." + std::to_string(end) +
                    " of the tensor, node " + std::to_string(node_id_) + ", slot " +
                    rs.slots[v.slot_index()]->name() + ")");
  }
  return Status::Ok();
}

void NodeState::VerifyForEpoch() {
  valid_steps_.clear();
  refusal_reasons_.clear();
  first_reason_.clear();
  std::vector<int64_t> drop;
  for (auto& [step, v] : versions_) {
    if (v.state() == proto::VERSION_CAPTURING) {
      const std::set<int32_t>& expected = pending_ranks_.empty() ? epoch_ranks_ : pending_ranks_;
      if (ChecksumAcked(&v, expected)) {
        MEMENTO_LOG(kInfo) << "version " << step << ": every local rank's capture was acknowledged before the "
                           << "epoch ended; its CRCs were completed";
      }
    }
    if (v.state() == proto::VERSION_CAPTURING) {
      std::string missing;
      for (int32_t r : pending_ranks_.empty() ? epoch_ranks_ : pending_ranks_) {
        if (!ContainsRank(v, r)) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
      refusal_reasons_[step] = "torn: rank " + missing + " on node " + std::to_string(node_id_) +
                               " never finished capturing it";
      drop.push_back(step);
      continue;
    }
    Status st;
    for (int32_t r : pending_ranks_) {
      auto rit = ranks_.find(r);
      st = rit == ranks_.end() ? NotFound("rank " + std::to_string(r) + " has no slots") : VerifyRank(v, rit->second);
      if (!st.ok()) break;
    }
    if (st.ok()) {
      valid_steps_.push_back(step);
    } else {
      MEMENTO_LOG(kWarning) << "version " << step << " refused: " << st.message();
      refusal_reasons_[step] = st.message();
    }
  }
  for (int64_t s : drop) {
    MEMENTO_LOG(kInfo) << "dropping torn version " << s;
    DropVersion(s).IgnoreError();
  }
  // The retired layout's versions this node holds intact, for in-memory resharding.
  retired_valid_.clear();
  for (auto it = retired_.versions.rbegin(); it != retired_.versions.rend(); ++it) {
    Status st;
    for (const auto& [r, rs] : retired_.ranks) {
      st = VerifyRank(it->second, rs);
      if (!st.ok()) break;
    }
    if (st.ok()) {
      if (retired_valid_.size() < TickPayload::kMaxListed) retired_valid_.push_back(it->first);
    } else {
      MEMENTO_LOG(kWarning) << "version " << it->first << " of the retired layout refused: " << st.message();
    }
  }
  protected_here_.clear();
  if (group_ != nullptr) {
    for (int64_t step : valid_steps_) {
      const proto::VersionRecord& v = versions_.at(step);
      if (v.is_protected() && VerifyParity(v)) protected_here_.insert(step);
    }
  }
  if (flusher_ != nullptr) {
    persisted_ = flusher_->CommittedSteps(TickPayload::kMaxListed);
    if (!persisted_.empty()) last_committed_ = std::max(last_committed_, persisted_[0]);
    if (load_target_ >= 0 && std::find(valid_steps_.begin(), valid_steps_.end(), load_target_) == valid_steps_.end()) {
      Status st = LoadFromStorage(load_target_);
      if (st.ok()) {
        valid_steps_.push_back(load_target_);
      } else {
        MEMENTO_LOG(kWarning) << "checkpoint " << flusher_->SourceDir(load_target_) << " refused: " << st.message();
        failed_loads_[load_target_] = st.message();
      }
    }
  }
  std::sort(valid_steps_.rbegin(), valid_steps_.rend());
  if (valid_steps_.size() > TickPayload::kMaxListed) valid_steps_.resize(TickPayload::kMaxListed);
  if (!refusal_reasons_.empty()) first_reason_ = refusal_reasons_.rbegin()->second;
}

void NodeState::OpenEpoch(const std::vector<TickPayload>& all) {
  refused_.clear();
  // Versions every agent holds intact; the newest is the restore point.
  std::map<int64_t, int> count;
  uint64_t max_incarnation = incarnation_;
  for (const TickPayload& p : all) {
    for (int i = 0; i < p.n_valid && i < TickPayload::kMaxListed; ++i) ++count[p.valid[i]];
    max_incarnation = std::max(max_incarnation, p.incarnation);
  }
  std::set<int64_t> common;
  for (const auto& [s, c] : count) {
    if (c == static_cast<int>(all.size())) common.insert(s);
  }
  const int64_t memory_point = common.empty() ? -1 : *common.rbegin();
  // A newer version the parity groups can rebuild comes first: memory is faster than storage.
  if (group_ != nullptr && PlanRebuild(all, memory_point)) return;
  // A newer version of an earlier layout that every node holds: the ranks reshard it in memory.
  std::string no_reshard;
  const int64_t reshard = PlanMemoryReshard(all, &no_reshard, &reshard_world_);
  reshard_point_ = reshard > memory_point ? reshard : -1;
  // A committed checkpoint newer than what memory holds everywhere, visible to every agent and not
  // refused by any: all agents load it, and the round is repeated.
  if (flusher_ != nullptr) {
    std::map<int64_t, int> seen_everywhere;
    std::set<int64_t> failed;
    for (const TickPayload& p : all) {
      for (int i = 0; i < p.n_persisted && i < TickPayload::kMaxListed; ++i) ++seen_everywhere[p.persisted[i]];
      for (int i = 0; i < p.n_failed_load && i < TickPayload::kMaxListed; ++i) failed.insert(p.failed_load[i]);
    }
    int64_t candidate = -1;
    for (const auto& [s, c] : seen_everywhere) {
      if (c == static_cast<int>(all.size()) && s > std::max(memory_point, reshard_point_) && !failed.count(s)) {
        candidate = std::max(candidate, s);
      }
    }
    if (candidate >= 0) {
      MEMENTO_LOG(kInfo) << "restoring step " << candidate << " from storage (" << flusher_->SourceDir(candidate) << ")";
      load_target_ = candidate;
      load_fallback_ = memory_point;
      storage_loaded_ = candidate;
      phase_ = 1;  // verify again, loading the checkpoint, in the next round
      return;
    }
    for (int64_t s : failed) {
      if (s <= memory_point) continue;
      auto it = failed_loads_.find(s);
      refused_.push_back("checkpoint " + flusher_->SourceDir(s) + " refused: " +
                         (it != failed_loads_.end() ? it->second : "another node could not load it"));
    }
  }
  restore_point_ = memory_point;
  // Nothing of the job was ever saved: no node saw a version complete everywhere or a checkpoint
  // committed, and nothing is held to restore. A restore then says so, and memento-run starts the
  // training over instead of stopping (nothing saved is lost).
  job_saved_ = memory_point >= 0 || reshard_point_ >= 0;
  for (const TickPayload& p : all) {
    job_saved_ = job_saved_ || p.saved != 0 || p.n_persisted > 0 || p.n_failed_load > 0 || p.retired_ranks > 0;
  }
  if (reshard_point_ >= 0) {
    MEMENTO_LOG(kInfo) << "version " << reshard_point_ << " of the earlier layout (world size "
                       << reshard_world_ << ") is in memory on every node: the ranks reshard it over NCCL";
  } else if (!no_reshard.empty()) {
    refused_.push_back("the earlier layout's versions in memory cannot be resharded: " + no_reshard);
  }
  if (group_ != nullptr) {
    Status st = EnsureParitySlots(GroupPadded(all));
    if (!st.ok()) {
      MEMENTO_LOG(kError) << "parity slots: " << st.ToString();
    }
  }
  std::vector<int64_t> drop;
  for (auto& [step, v] : versions_) {
    if (common.count(step)) {
      if (v.state() != proto::VERSION_GLOBALLY_COMPLETE) {
        v.set_state(proto::VERSION_GLOBALLY_COMPLETE);
        catalog_->PutVersion(v).IgnoreError();
      }
      continue;
    }
    drop.push_back(step);
  }
  // Explain every step that some agent held but that is not restorable everywhere.
  std::set<int64_t> seen;
  for (const TickPayload& p : all) {
    for (int i = 0; i < p.n_valid && i < TickPayload::kMaxListed; ++i) seen.insert(p.valid[i]);
  }
  for (const auto& [s, why] : refusal_reasons_) seen.insert(s);
  for (int64_t s : seen) {
    if (common.count(s) || s < restore_point_) continue;
    std::string why;
    auto rit = refusal_reasons_.find(s);
    if (rit != refusal_reasons_.end()) {
      why = rit->second;
    } else {
      for (const TickPayload& p : all) {
        bool has = false;
        for (int i = 0; i < p.n_valid; ++i) has |= p.valid[i] == s;
        if (!has) {
          why = "node " + std::to_string(p.node_id) + " does not hold it intact";
          if (p.reason[0] != '\0') why += " (" + std::string(p.reason, strnlen(p.reason, TickPayload::kReasonBytes)) + ")";
          break;
        }
      }
    }
    refused_.push_back("version " + std::to_string(s) + " refused: " + why);
  }
  for (int64_t s : drop) DropVersion(s).IgnoreError();
  if (!ec_refusals_.empty()) {
    std::string fallback = "nothing: no version is left in memory or storage";
    auto it = versions_.find(restore_point_);
    if (flusher_ != nullptr && restore_point_ >= 0 && restore_point_ == storage_loaded_) {
      // Some nodes loaded it from storage (this one may have had it in memory).
      fallback = "version " + std::to_string(restore_point_) + " from " + flusher_->SourceDir(restore_point_);
    } else if (it != versions_.end()) {
      fallback = "version " + std::to_string(restore_point_) +
                 (it->second.source().empty() ? " held in memory" : " from " + it->second.source());
    }
    for (const auto& r : ec_refusals_) refused_.push_back(r + "; falling back to " + fallback);
  }
  ec_refusals_.clear();
  storage_loaded_ = -1;
  rebuild_attempted_.clear();
  rebuild_target_ = -1;
  load_target_ = -1;
  failed_loads_.clear();
  incarnation_ = max_incarnation + 1;
  epoch_ranks_ = pending_ranks_;
  pending_ranks_.clear();
  pending_world_size_ = 0;
  epoch_open_ = true;
  phase_ = 0;
  ReleaseSpares("the new layout's ranks all registered");
  auto node = catalog_->GetNode();
  if (node.ok()) {
    node->set_incarnation(incarnation_);
    catalog_->PutNode(*node).IgnoreError();
  }
  MEMENTO_LOG(kInfo) << "incarnation " << incarnation_ << " open with " << epoch_ranks_.size()
                     << " local ranks; restore point " << restore_point_;
  for (const auto& r : refused_) MEMENTO_LOG(kWarning) << r;
  cv_.notify_all();
}

TickPayload NodeState::MakeTick(bool stop) {
  std::lock_guard<std::mutex> lock(mu_);
  TickPayload p;
  p.node_id = node_id_;
  p.saved = saved_ ? 1 : 0;
  p.phase = phase_;
  p.registered = static_cast<int32_t>(pending_ranks_.size());
  p.world_size = pending_world_size_;
  p.incarnation = incarnation_;
  p.stop = stop ? 1 : 0;
  for (auto it = versions_.rbegin(); it != versions_.rend() && p.n_local < TickPayload::kMaxListed; ++it) {
    if (it->second.state() == proto::VERSION_LOCALLY_COMPLETE) p.local_complete[p.n_local++] = it->first;
  }
  if (phase_ == 2) {
    for (int64_t s : valid_steps_) p.valid[p.n_valid++] = s;
    std::strncpy(p.reason, first_reason_.c_str(), TickPayload::kReasonBytes - 1);
    for (int64_t s : persisted_) {
      if (p.n_persisted < TickPayload::kMaxListed) p.persisted[p.n_persisted++] = s;
    }
    for (const auto& [s, why] : failed_loads_) {
      if (p.n_failed_load < TickPayload::kMaxListed) p.failed_load[p.n_failed_load++] = s;
    }
  }
  for (int32_t r : pending_ranks_) {
    auto it = ranks_.find(r);
    if (it != ranks_.end() && HasCudaTensors(it->second.record)) ++p.cuda_registered;
  }
  if (phase_ == 2 && !retired_.empty()) {
    p.retired_world = retired_.world_size;
    p.retired_ranks = static_cast<int32_t>(retired_.ranks.size());
    for (int64_t s : retired_valid_) p.retired[p.n_retired++] = s;
  }
  if (nccl_id_incarnation_ == incarnation_ && !nccl_id_.empty()) {
    p.nccl_id_incarnation = nccl_id_incarnation_;
    p.nccl_id_bytes = static_cast<int32_t>(nccl_id_.size());
    std::memcpy(p.nccl_id, nccl_id_.data(), nccl_id_.size());
  }
  if (group_ != nullptr) {
    for (int32_t r : epoch_open_ ? epoch_ranks_ : pending_ranks_) {
      auto it = ranks_.find(r);
      if (it != ranks_.end()) p.data_bytes += it->second.record.slot_bytes();
    }
    if (phase_ == 2) {
      for (auto it = protected_here_.rbegin(); it != protected_here_.rend() && p.n_protected < TickPayload::kMaxListed; ++it) {
        p.protected_valid[p.n_protected++] = *it;
      }
    }
    p.encode_order = coordinator_ ? encode_order_ : -1;
    p.protected_step = coordinator_ ? protected_announce_ : -1;
    p.encode_step = encode_current_;
    p.encode_state = encode_state_.load();
    p.newest_protected = NewestProtected();
  }
  if (flusher_ != nullptr) {
    p.flush_order = coordinator_ ? flush_order_ : -1;
    Flusher::Progress fp = flusher_->progress();
    p.flush_step = fp.step;
    p.flush_state = static_cast<int32_t>(fp.state);
  }
  return p;
}

bool NodeState::ApplyTick(const std::vector<TickPayload>& all) {
  std::lock_guard<std::mutex> lock(mu_);
  bool stop = false;
  bool all_open = true, all_waiting = true, all_verified = true, all_rebuilding = true;
  int32_t registered = 0, world = 0;
  for (const TickPayload& p : all) {
    stop |= p.stop != 0;
    all_open &= p.phase == 0;
    all_waiting &= p.phase == 1;
    all_verified &= p.phase == 2;
    all_rebuilding &= p.phase == 3;
    registered += p.registered;
    world = std::max(world, p.world_size);
  }
  if (stop) return true;
  job_registered_ = registered;
  for (const TickPayload& p : all) {
    if (p.nccl_id_bytes > 0 && p.nccl_id_bytes <= static_cast<int32_t>(sizeof p.nccl_id) &&
        p.nccl_id_incarnation == incarnation_ && epoch_open_ && nccl_id_incarnation_ != incarnation_) {
      nccl_id_.assign(p.nccl_id, static_cast<size_t>(p.nccl_id_bytes));
      nccl_id_incarnation_ = incarnation_;
      cv_.notify_all();
    }
  }
  if (group_ != nullptr) {
    int64_t everywhere = INT64_MAX;
    for (const TickPayload& p : all) everywhere = std::min(everywhere, p.newest_protected);
    if (everywhere != protected_everywhere_) {
      protected_everywhere_ = everywhere;
      cv_.notify_all();  // a slot may have come free
    }
  }
  if (all_open) {
    // Global completion: a step every agent holds locally complete.
    bool changed = false;
    for (auto& [step, v] : versions_) {
      if (v.state() != proto::VERSION_LOCALLY_COMPLETE) continue;
      bool everywhere = true;
      for (const TickPayload& p : all) {
        bool has = false;
        for (int i = 0; i < p.n_local; ++i) has |= p.local_complete[i] == step;
        everywhere &= has;
      }
      if (everywhere) {
        v.set_state(proto::VERSION_GLOBALLY_COMPLETE);
        catalog_->PutVersion(v).IgnoreError();
        changed = true;
        MEMENTO_LOG(kDebug) << "step " << step << " globally complete";
      }
    }
    if (changed) cv_.notify_all();
    if (changed) MarkSaved();
    if (changed && !retired_.empty()) DropRetired("a version of the new layout is globally complete");
    EncodeRound(all);
    FlushRound(all);
  } else if (all_waiting && world > 0 && registered == world) {
    VerifyForEpoch();
    phase_ = 2;
  } else if (all_verified) {
    OpenEpoch(all);
  } else if (all_rebuilding) {
    RebuildRound(all);
  }
  return false;
}


// ---- storage --------------------------------------------------------------------------------

std::vector<proto::RegionCrc> NodeState::RegionCrcs(const proto::RankRecord& layout, const uint8_t* base) {
  const uint64_t chunk = std::max<uint64_t>(options_.crc_chunk_bytes, 4096);
  std::vector<proto::RegionCrc> regions = RegionLayout(layout, chunk);
  TaskGroup group;
  for (auto& r : regions) {
    for (int c = 0; c < r.chunk_crcs_size(); ++c) {
      group.Add();
      verify_pool_->Submit([&, c, rp = &r] {
        const uint64_t begin = rp->offset() + static_cast<uint64_t>(c) * chunk;
        const uint64_t len = std::min<uint64_t>(chunk, rp->offset() + rp->bytes() - begin);
        rp->set_chunk_crcs(c, Crc64(base + begin, len));
        group.Done();
      });
    }
  }
  group.Wait();
  return regions;
}

Status NodeState::LoadFromStorage(int64_t step) {
  std::set<int> used;
  for (const auto& [s, v] : versions_) used.insert(v.slot_index());
  int slot = -1;
  for (int k = 0; k < options_.slots_per_rank && slot < 0; ++k) {
    if (!used.count(k)) slot = k;
  }
  if (slot < 0) {
    // Every slot holds a version, and none of them can be restored: the agents agreed on this
    // checkpoint because no version newer than it is held, or can be rebuilt, everywhere (nodes
    // lost beyond the scheme's tolerance leave their peers' versions useless). One of them makes
    // room: first one that not every node holds, then the oldest; never the newest version every
    // node holds, which the job falls back to if another node cannot load the checkpoint.
    int64_t dropped = -1;
    for (const auto& [s, v] : versions_) {  // oldest first
      if (s == load_fallback_ || s == encode_current_ || s == flush_current_) continue;
      if (dropped < 0 || (s > load_fallback_ && dropped < load_fallback_)) dropped = s;
    }
    if (dropped < 0) {
      return ResourceExhausted("no free slot on node " + std::to_string(node_id_) + " to load step " +
                               std::to_string(step) + " into: every slot holds a version that is in use");
    }
    slot = versions_.at(dropped).slot_index();
    MEMENTO_LOG(kInfo) << "dropping version " << dropped << " (it cannot be restored: "
                       << (dropped > load_fallback_ ? "not every node holds it" : "older than the checkpoint")
                       << ") to load step " << step << " into its slot";
    MEMENTO_RETURN_IF_ERROR(DropVersion(dropped));
  }
  proto::VersionRecord v = NewVersion(step, slot, proto::VERSION_LOCALLY_COMPLETE, incarnation_);
  v.set_persisted(true);
  v.set_source(flusher_->SourceDir(step));
  for (int32_t r : pending_ranks_) {
    auto it = ranks_.find(r);
    if (it == ranks_.end()) return Internal("rank " + std::to_string(r) + " has no slots");
    uint8_t* base = it->second.slots.at(slot)->data();
    MEMENTO_RETURN_IF_ERROR(flusher_->Load(step, it->second.record, base));
    proto::RankCapture* cap = v.add_captured();
    cap->set_rank(r);
    for (auto& region : RegionCrcs(it->second.record, base)) *cap->add_crcs() = std::move(region);
  }
  MEMENTO_RETURN_IF_ERROR(catalog_->PutVersion(v));
  versions_[step] = v;
  MEMENTO_LOG(kInfo) << "step " << step << " loaded from " << v.source() << " for " << pending_ranks_.size()
                     << " ranks";
  return Status::Ok();
}

void NodeState::FlushRound(const std::vector<TickPayload>& all) {
  if (flusher_ == nullptr || all.empty()) return;
  using S = Flusher::State;
  const TickPayload& c = all[0];  // the coordinator's published order and progress
  const double now =
      std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();

  // Outcome of the current flush, as the coordinator published it.
  if (flush_current_ >= 0 && c.flush_step == flush_current_ && c.flush_state == static_cast<int32_t>(S::kCommitted)) {
    auto it = versions_.find(flush_current_);
    if (it != versions_.end()) {
      it->second.set_persisted(true);
      catalog_->PutVersion(it->second).IgnoreError();
    }
    LogEvent(node_id_, flush_current_, "committed");
    MarkSaved();
    last_committed_ = std::max(last_committed_, flush_current_);
    flush_errors_.erase(flush_current_);
    if (flusher_->Reset()) flush_current_ = -1;
    cv_.notify_all();
  } else if (flush_current_ >= 0 && c.flush_order != flush_current_) {
    // Aborted: release the version once this node's writer has stopped.
    if (flusher_->Reset()) {
      flush_current_ = -1;
      cv_.notify_all();
    }
  }
  Flusher::Progress mine = flusher_->progress();
  if ((mine.state == S::kFailed || mine.state == S::kCommitFailed) && mine.step >= 0) {
    flush_errors_[mine.step] = mine.error;
  }
  // Follow the order.
  if (c.flush_order >= 0 && flush_current_ < 0 && c.flush_order > last_committed_ && mine.state == S::kIdle) {
    auto it = versions_.find(c.flush_order);
    if (it != versions_.end() && it->second.state() == proto::VERSION_GLOBALLY_COMPLETE) {
      std::vector<Flusher::RankJob> jobs;
      int32_t world = 0;
      for (int32_t r : epoch_ranks_) {
        auto rit = ranks_.find(r);
        if (rit == ranks_.end()) continue;
        Flusher::RankJob job{rit->second.record, rit->second.slots.at(it->second.slot_index()), {}};
        for (const proto::RankCapture& cap : it->second.captured()) {
          if (cap.rank() == r) job.crcs.assign(cap.crcs().begin(), cap.crcs().end());
        }
        jobs.push_back(std::move(job));
        world = rit->second.record.world_size();
      }
      flush_current_ = c.flush_order;
      flusher_->StartWrite(flush_current_, world, std::move(jobs));
    }
  }
  if (!coordinator_) return;

  // Coordinator: judge the round, commit, abort, or order the next flush.
  if (flush_order_ >= 0) {
    bool all_written = true;
    int failed_node = -1;
    for (const TickPayload& p : all) {
      if (p.flush_step != flush_order_) {
        all_written = false;
        continue;
      }
      if (p.flush_state == static_cast<int32_t>(S::kFailed)) failed_node = p.node_id;
      if (p.flush_state != static_cast<int32_t>(S::kWritten)) all_written = false;
    }
    const bool committed = c.flush_step == flush_order_ && c.flush_state == static_cast<int32_t>(S::kCommitted);
    const bool commit_failed = c.flush_step == flush_order_ && c.flush_state == static_cast<int32_t>(S::kCommitFailed);
    if (committed) {
      flush_order_ = -1;
      retry_backoff_ = 0;
    } else if (failed_node >= 0 || commit_failed) {
      retry_backoff_ = retry_backoff_ == 0 ? options_.flush_retry_s : std::min(60.0, retry_backoff_ * 2);
      retry_after_ = now + retry_backoff_;
      MEMENTO_LOG(kError) << "flush of step " << flush_order_ << " failed "
                          << (commit_failed ? std::string("committing the manifest")
                                            : "on node " + std::to_string(failed_node))
                          << "; the version stays in memory; retrying in " << retry_backoff_ << " s";
      flush_order_ = -1;
    } else if (all_written && mine.step == flush_order_ && mine.state == S::kWritten) {
      int32_t world = 0;
      for (const auto& [r, rs] : ranks_) world = std::max(world, rs.record.world_size());
      LogEvent(node_id_, flush_order_, "committing");  // before the manifest can exist
      flusher_->StartCommit(flush_order_, world);
    }
    return;
  }
  if (now < retry_after_ || flush_current_ >= 0 || mine.state != S::kIdle) return;
  if (now - last_flush_start_ < options_.flush_interval_s) return;
  // Newest first: the newest globally complete version the policy admits.
  for (auto it = versions_.rbegin(); it != versions_.rend(); ++it) {
    const int64_t step = it->first;
    if (step <= last_committed_) break;
    if (it->second.state() != proto::VERSION_GLOBALLY_COMPLETE || it->second.persisted()) continue;
    if (options_.flush_every > 1 && step % options_.flush_every != 0) continue;
    flush_order_ = step;
    last_flush_start_ = now;
    MEMENTO_LOG(kInfo) << "flushing step " << step;
    break;
  }
}


// ---- erasure coding ---------------------------------------------------------------------------

uint64_t NodeState::GroupPadded(const std::vector<TickPayload>& all) const {
  uint64_t largest = 0;
  for (int pos : group_->members()) largest = std::max(largest, all.at(pos).data_bytes);
  return largest == 0 ? 0 : group_->PaddedLength(largest);
}

NodeData NodeState::DataOf(int slot, const std::set<int32_t>& ranks) {
  NodeData data;
  for (int32_t r : ranks) {  // rank order: identical layout before and after a rebuild
    auto it = ranks_.find(r);
    if (it != ranks_.end()) data.Add(it->second.slots.at(slot)->data(), it->second.record.slot_bytes());
  }
  return data;
}

Status NodeState::EnsureParitySlots(uint64_t padded) {
  if (group_ == nullptr || padded == 0) return Status::Ok();
  if (padded == padded_ && static_cast<int>(parity_.size()) == options_.slots_per_rank) return Status::Ok();
  const uint64_t bytes = group_->ParityLength(padded);
  parity_.clear();
  padded_ = 0;
  for (int k = 0; k < options_.slots_per_rank; ++k) {
    const std::string name = ShmPrefix(options_.job_id, node_id_) + "-q" + std::to_string(k);
    if (SharedMemory::Exists(name)) SharedMemory::Unlink(name).IgnoreError();
    auto seg = SharedMemory::Create(name, bytes);
    if (!seg.ok()) {
      parity_.clear();
      return seg.status().WithContext("creating parity slot " + std::to_string(k));
    }
    parity_.push_back(std::move(seg).value());
  }
  padded_ = padded;
  auto node = catalog_->GetNode();
  if (node.ok()) {
    node->set_padded_length(padded_);
    MEMENTO_RETURN_IF_ERROR(catalog_->PutNode(*node));
  }
  MEMENTO_LOG(kInfo) << "parity slots: " << options_.slots_per_rank << " x " << FormatBytes(bytes) << " (group "
                     << group_->group_id() << ", " << group_->scheme().ToString() << ", padded data "
                     << FormatBytes(padded) << ")";
  return Status::Ok();
}

bool NodeState::VerifyParity(const proto::VersionRecord& v) {
  if (v.padded_length() == 0 || v.padded_length() != padded_ || v.slot_index() < 0 ||
      v.slot_index() >= static_cast<int>(parity_.size())) {
    return false;
  }
  const uint8_t* base = parity_[v.slot_index()]->data();
  for (const auto& r : v.parity_crcs()) {
    Status valid = CheckRegionCrc(r, parity_[v.slot_index()]->size());
    if (!valid.ok()) {
      MEMENTO_LOG(kWarning) << "parity of step " << v.step() << " on node " << node_id_ << " fails its CRC: "
                            << valid.message();
      return false;
    }
    for (int c = 0; c < r.chunk_crcs_size(); ++c) {
      const auto [begin, end] = RegionChunk(r, c);
      if (Crc64(base + begin, end - begin) != r.chunk_crcs(c)) {
        MEMENTO_LOG(kWarning) << "parity of step " << v.step() << " on node " << node_id_ << " fails its CRC";
        return false;
      }
    }
  }
  return !v.parity_crcs().empty();
}

namespace {

std::vector<proto::RegionCrc> ParityCrcs(const uint8_t* parity, uint64_t bytes, uint64_t chunk) {
  proto::RegionCrc r;
  r.set_name("parity");
  r.set_offset(0);
  r.set_bytes(bytes);
  r.set_chunk_bytes(chunk);
  for (uint64_t off = 0; off < bytes || (bytes == 0 && off == 0); off += chunk) {
    r.add_chunk_crcs(Crc64(parity + off, std::min<uint64_t>(chunk, bytes - off)));
    if (bytes == 0) break;
  }
  return {r};
}

}  // namespace

void NodeState::StartEncode(int64_t step) {
  auto it = versions_.find(step);
  const bool have = it != versions_.end() && it->second.state() == proto::VERSION_GLOBALLY_COMPLETE && padded_ > 0 &&
                    it->second.slot_index() < static_cast<int>(parity_.size());
  const uint64_t padded = padded_;
  NodeData data;
  std::shared_ptr<SharedMemory> parity_seg;
  std::vector<std::shared_ptr<SharedMemory>> keep;  // slots stay mapped while the encoder reads them
  // This node's CRC records of the version: its peers keep them to verify a rebuild of this node.
  proto::PeerCaptures mine;
  mine.set_member(group_->index());
  if (have) {
    for (const auto& c : it->second.captured()) *mine.add_captures() = c;
    const int slot = it->second.slot_index();
    data = DataOf(slot, epoch_ranks_);
    for (int32_t r : epoch_ranks_) {
      auto rit = ranks_.find(r);
      if (rit != ranks_.end()) keep.push_back(rit->second.slots.at(slot));
    }
    parity_seg = parity_[slot];
  }
  encode_current_ = step;
  encode_state_ = 1;
  if (encoder_.joinable()) encoder_.join();
  const uint64_t chunk = std::max<uint64_t>(options_.crc_chunk_bytes, 4096);
  encoder_ = std::thread([this, step, have, padded, data, parity_seg, keep, chunk,
                          mine = mine.SerializeAsString()]() mutable {
    KillPoint("agent.encode", node_id_, step);
    // Every member takes part in the collective, even one that lost the version (zeros, failed).
    const uint64_t bytes = padded > 0 ? group_->ParityLength(padded) : 0;
    std::vector<uint8_t> scratch;
    uint8_t* parity = parity_seg ? parity_seg->data() : nullptr;
    if (parity == nullptr) {
      scratch.resize(bytes);
      parity = scratch.data();
    }
    Status st = padded == 0                        ? FailedPrecondition("no parity slots")
                : options_.ec_encode == "holders" ? group_->EncodeToHolders(data, padded, parity)
                                                  : group_->Encode(data, padded, parity);
    std::vector<proto::RegionCrc> crcs;
    if (st.ok() && have) crcs = ParityCrcs(parity, bytes, chunk);
    // Every member takes part here too, whatever happened above.
    std::vector<std::string> peers;
    Status shared = group_->ShareBlobs(have ? mine : std::string(), &peers);
    if (st.ok() && !shared.ok()) st = shared;
    std::lock_guard<std::mutex> lock(mu_);
    encode_crcs_ = std::move(crcs);
    encode_peers_ = std::move(peers);
    encode_error_ = st.ok() ? (have ? "" : "version not held on this node") : st.message();
    if (!encode_error_.empty()) {
      MEMENTO_LOG(kError) << "erasure coding of step " << step << " failed on node " << node_id_ << ": "
                          << encode_error_;
    }
    encode_state_ = st.ok() && have ? 2 : 3;
  });
}

void NodeState::EncodeRound(const std::vector<TickPayload>& all) {
  if (group_ == nullptr || all.empty()) return;
  const TickPayload& c = all[0];
  // Outcome, as the coordinator published it.
  if (encode_current_ >= 0 && c.protected_step == encode_current_) {
    if (encode_state_ == 2) {
      auto it = versions_.find(encode_current_);
      if (it != versions_.end()) {
        // Logged before anything records it: the event log's "protecting" steps are a superset of
        // what the catalogs say is protected (memento-stress's upper bound).
        LogEvent(node_id_, encode_current_, "protecting");
        // The round that announces the protection completed here; a node that dies (or hangs) at
        // this point never records it while the others do.
        KillPoint("agent.protect", node_id_, encode_current_);
        it->second.set_is_protected(true);
        it->second.set_padded_length(padded_);
        it->second.clear_parity_crcs();
        for (const auto& r : encode_crcs_) *it->second.add_parity_crcs() = r;
        it->second.clear_peer_captures();
        for (size_t i = 0; i < encode_peers_.size(); ++i) {
          proto::PeerCaptures pc;
          if (static_cast<int>(i) == group_->index() || !pc.ParseFromString(encode_peers_[i])) continue;
          *it->second.add_peer_captures() = std::move(pc);
        }
        catalog_->PutVersion(it->second).IgnoreError();
        MEMENTO_LOG(kDebug) << "step " << encode_current_ << " protected";
        LogEvent(node_id_, encode_current_, "protected");
      }
      last_protected_ = std::max(last_protected_, encode_current_);
    }
    if (encode_state_ != 1) {
      encode_current_ = -1;
      encode_state_ = 0;
      cv_.notify_all();
    }
  } else if (encode_current_ >= 0 && c.encode_order != encode_current_ && encode_state_ != 1) {
    encode_current_ = -1;  // aborted
    encode_state_ = 0;
    cv_.notify_all();
  }
  // Follow the order.
  if (c.encode_order >= 0 && encode_current_ < 0 && encode_state_ == 0 && c.encode_order > last_protected_) {
    StartEncode(c.encode_order);
  }
  if (!coordinator_) return;
  if (protected_announce_ >= 0 && c.protected_step == protected_announce_) protected_announce_ = -1;  // delivered
  if (encode_order_ >= 0) {
    bool finished = true, failed = false;
    for (const TickPayload& p : all) {
      if (p.encode_step != encode_order_ || (p.encode_state != 2 && p.encode_state != 3)) finished = false;
      if (p.encode_step == encode_order_ && p.encode_state == 3) failed = true;
    }
    if (finished && failed) {
      MEMENTO_LOG(kError) << "erasure coding of step " << encode_order_ << " failed on some node; it stays unprotected";
      encode_order_ = -1;
    } else if (finished) {
      protected_announce_ = encode_order_;
      encode_order_ = -1;
    }
    return;
  }
  if (protected_announce_ >= 0 || encode_current_ >= 0 || padded_ == 0) return;
  for (auto it = versions_.rbegin(); it != versions_.rend(); ++it) {  // newest first
    if (it->first <= last_protected_) break;
    if (it->second.state() == proto::VERSION_GLOBALLY_COMPLETE && !it->second.is_protected()) {
      encode_order_ = it->first;
      break;
    }
  }
}

bool NodeState::PlanRebuild(const std::vector<TickPayload>& all, int64_t memory_point) {
  std::set<int64_t> candidates;
  for (const TickPayload& p : all) {
    for (int i = 0; i < p.n_protected && i < TickPayload::kMaxListed; ++i) {
      if (p.protected_valid[i] > memory_point && !rebuild_attempted_.count(p.protected_valid[i])) {
        candidates.insert(p.protected_valid[i]);
      }
    }
  }
  auto has = [&](const TickPayload& p, int64_t step) {
    for (int i = 0; i < p.n_protected && i < TickPayload::kMaxListed; ++i) {
      if (p.protected_valid[i] == step) return true;
    }
    return false;
  };
  for (auto it = candidates.rbegin(); it != candidates.rend(); ++it) {
    const int64_t step = *it;
    std::string why;
    std::string rebuilding;
    for (size_t g = 0; g < group_->all_groups().size() && why.empty(); ++g) {
      const auto& members = group_->all_groups()[g];
      std::vector<int> lost;
      std::string nodes;
      for (size_t i = 0; i < members.size(); ++i) {
        if (has(all.at(members[i]), step)) continue;
        lost.push_back(static_cast<int>(i));
        nodes += (nodes.empty() ? "" : ", ") + std::to_string(all.at(members[i]).node_id);
      }
      if (lost.empty()) continue;
      auto layout = StripeLayout::Create(group_->scheme(), static_cast<int>(members.size()));
      Status st = layout.ok() ? layout->CheckRecoverable(lost) : layout.status();
      if (!st.ok()) {
        why = "group " + std::to_string(g) + " (lost nodes " + nodes + "): " + st.message();
      } else {
        rebuilding += (rebuilding.empty() ? "" : "; ") + std::string("group ") + std::to_string(g) + " rebuilds nodes " + nodes;
      }
    }
    if (!why.empty()) {
      const std::string msg = "version " + std::to_string(step) + " is not recoverable from memory: " + why;
      MEMENTO_LOG(kWarning) << msg;
      ec_refusals_.push_back(msg);
      rebuild_attempted_.insert(step);
      continue;
    }
    MEMENTO_LOG(kInfo) << "rebuilding step " << step << " from parity: " << rebuilding;
    rebuild_lost_.clear();
    for (size_t i = 0; i < group_->members().size(); ++i) {
      if (!has(all.at(group_->members()[i]), step)) rebuild_lost_.push_back(static_cast<int>(i));
    }
    rebuild_target_ = step;
    phase_ = 3;
    return true;
  }
  return false;
}

void NodeState::RebuildRound(const std::vector<TickPayload>& all) {
  const int64_t step = rebuild_target_;
  rebuild_attempted_.insert(step);
  phase_ = 1;  // verify again once rebuilt
  const std::vector<int> lost = rebuild_lost_;  // decided from the verified round's payloads
  const bool me_lost = std::find(lost.begin(), lost.end(), group_->index()) != lost.end();
  const uint64_t padded = GroupPadded(all);
  using Clock = std::chrono::steady_clock;
  auto since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
  const Clock::time_point t0 = Clock::now();
  Status st = EnsureParitySlots(padded);
  const double slots_s = since(t0);
  int slot = -1;
  auto vit = versions_.find(step);
  if (vit != versions_.end()) {
    slot = vit->second.slot_index();  // a corrupted copy is rebuilt in place
  } else {
    std::set<int> used;
    for (const auto& [s, v] : versions_) used.insert(v.slot_index());
    for (int k = 0; k < options_.slots_per_rank && slot < 0; ++k) {
      if (!used.count(k)) slot = k;
    }
  }
  // Every member of the group takes part in the exchange, whatever happens here.
  NodeData data;
  std::vector<uint8_t> scratch;
  uint8_t* parity = nullptr;
  if (st.ok() && slot >= 0 && slot < static_cast<int>(parity_.size())) {
    data = DataOf(slot, pending_ranks_);
    parity = parity_[slot]->data();
  } else {
    scratch.resize(padded > 0 ? group_->ParityLength(padded) : 0);
    parity = scratch.data();
    if (st.ok()) st = ResourceExhausted("no free slot on node " + std::to_string(node_id_) + " to rebuild into");
  }
  const Clock::time_point t1 = Clock::now();
  Status rb = group_->Rebuild(lost, &data, parity, padded);
  const double rebuild_s = since(t1);
  // The lost members get their pre-loss CRC records back from the survivors, to verify the rebuild.
  std::string kept;
  Status crcs = group_->SendToLost(
      lost,
      [&](int member) {
        if (vit == versions_.end()) return std::string();
        for (const auto& pc : vit->second.peer_captures()) {
          if (pc.member() == member) return pc.SerializeAsString();
        }
        return std::string();
      },
      &kept);
  if (!me_lost) return;
  const Clock::time_point t2 = Clock::now();
  if (rb.ok() && !crcs.ok()) rb = crcs;
  if (!st.ok() || !rb.ok()) {
    MEMENTO_LOG(kError) << "rebuilding step " << step << " on node " << node_id_ << " failed: "
                        << (st.ok() ? rb : st).ToString();
    return;
  }
  LogEvent(node_id_, step, "protecting");  // rebuilt with its parity: protected here once recorded
  proto::VersionRecord v = NewVersion(step, slot, proto::VERSION_LOCALLY_COMPLETE, incarnation_);
  v.set_is_protected(true);
  v.set_padded_length(padded);
  v.set_rebuilt_from("group " + std::to_string(group_->group_id()));
  for (const auto& r : ParityCrcs(parity, group_->ParityLength(padded), std::max<uint64_t>(options_.crc_chunk_bytes, 4096))) {
    *v.add_parity_crcs() = r;
  }
  proto::PeerCaptures before;
  if (!kept.empty() && before.ParseFromString(kept) && before.captures_size() > 0) {
    // Verify the rebuilt bytes against the CRCs recorded before the loss.
    for (const auto& cap : before.captures()) {
      *v.add_captured() = cap;
      auto rit = ranks_.find(cap.rank());
      Status ok = rit == ranks_.end() ? NotFound("rank " + std::to_string(cap.rank()) + " is not registered here")
                                      : VerifyRank(v, rit->second);
      if (!ok.ok()) {
        MEMENTO_LOG(kError) << "rebuilt step " << step << " on node " << node_id_
                            << " does not match its pre-loss CRCs: " << ok.message();
        return;
      }
    }
  } else {
    MEMENTO_LOG(kWarning) << "no pre-loss CRCs of step " << step << " for node " << node_id_
                          << " in its group; recording fresh ones";
    for (int32_t r : pending_ranks_) {
      proto::RankCapture* cap = v.add_captured();
      cap->set_rank(r);
      for (auto& region : RegionCrcs(ranks_.at(r).record, ranks_.at(r).slots.at(slot)->data())) {
        *cap->add_crcs() = std::move(region);
      }
    }
  }
  catalog_->PutVersion(v).IgnoreError();
  versions_[step] = v;
  LogEvent(node_id_, step, "protected");
  char timing[160];
  std::snprintf(timing, sizeof timing, " in %.2f s (slots %.2f, decode and transfer %.2f, verify %.2f)", since(t0),
                slots_s, rebuild_s, since(t2));
  MEMENTO_LOG(kInfo) << "step " << step << " rebuilt on node " << node_id_ << " from its parity group ("
                     << FormatBytes(data.size()) << " of data, " << FormatBytes(group_->ParityLength(padded))
                     << " of parity" << (before.captures_size() > 0 ? ", CRCs verified" : "") << ")" << timing;
}

}  // namespace memento
