// NodeState's retired layout: the versions of the job's earlier layout, kept in memory after its
// ranks registered a new one, so that the new layout reshards them over NCCL instead of loading a
// checkpoint (node_state.h, RetireLayout; the client side is snapshot/memory_reshard.h).
#include <algorithm>
#include <chrono>
#include <cstring>

#include "agent/node_state.h"
#include "core/log.h"

namespace memento {

bool NodeState::RetiredHoldsName(const std::string& name) const {
  for (const auto& [r, rs] : retired_.ranks) {
    for (const std::string& n : rs.record.slot_names()) {
      if (n == name) return true;
    }
  }
  return false;
}

bool NodeState::SlotNameTaken(const std::string& name) const {
  if (RetiredHoldsName(name) || names_in_flight_.count(name)) return true;
  for (const auto& seg : retired_.spares) {
    if (seg->name() == name) return true;
  }
  for (const auto& [r, rs] : ranks_) {
    for (const std::string& n : rs.record.slot_names()) {
      if (n == name) return true;
    }
  }
  return false;
}

std::vector<std::shared_ptr<SharedMemory>> NodeState::TakeSpares(int n, uint64_t bytes) {
  std::vector<std::shared_ptr<SharedMemory>> taken;
  auto& spares = retired_.spares;
  // Same size first (nothing to resize), then the largest (shrinking only frees pages).
  std::stable_sort(spares.begin(), spares.end(), [bytes](const auto& a, const auto& b) {
    if ((a->size() == bytes) != (b->size() == bytes)) return a->size() == bytes;
    return a->size() > b->size();
  });
  while (static_cast<int>(taken.size()) < n && !spares.empty()) {
    taken.push_back(std::move(spares.front()));
    spares.erase(spares.begin());
    slot_bytes_in_use_ -= taken.back()->size();
  }
  if (!taken.empty()) PersistRetired().IgnoreError();  // a crash now releases them (RecoverRetired)
  return taken;
}

void NodeState::ReleaseSpares(const std::string& why) {
  if (retired_.spares.empty()) return;
  uint64_t bytes = 0;
  for (const auto& seg : retired_.spares) {
    bytes += seg->size();
    SharedMemory::Unlink(seg->name()).IgnoreError();
  }
  slot_bytes_in_use_ -= bytes;
  MEMENTO_LOG(kInfo) << "released " << retired_.spares.size() << " spare slots (" << FormatBytes(bytes)
                     << ") of the retired layout: " << why;
  retired_.spares.clear();
  if (!retired_.empty()) PersistRetired().IgnoreError();
}

Status NodeState::RecoverRetired() {
  auto rec = catalog_->GetRetired();
  if (!rec.ok()) return rec.status().code() == StatusCode::kNotFound ? Status::Ok() : rec.status();
  // Spares were kept for a registration round that this agent's restart ended: released.
  for (const std::string& name : rec->spare_slot_names()) {
    if (SharedMemory::Exists(name)) SharedMemory::Unlink(name).IgnoreError();
  }
  Retired back;
  back.world_size = rec->world_size();
  for (const proto::RankRecord& r : rec->ranks()) {
    RankSlots rs;
    rs.record = r;
    Status st = CheckRankLayout(r);
    for (const std::string& name : r.slot_names()) {
      if (!st.ok()) break;
      if (name.empty()) {  // released when retired: it held no version
        rs.slots.push_back(nullptr);
        continue;
      }
      auto seg = SharedMemory::Open(name, r.slot_bytes(), /*writable=*/true);
      if (!seg.ok()) {
        st = seg.status();
        break;
      }
      rs.slots.push_back(std::move(seg).value());
    }
    slot_bytes_in_use_ += r.slot_bytes() * rs.held();
    back.ranks.emplace(r.rank(), std::move(rs));
    if (!st.ok()) {
      retired_ = std::move(back);
      DropRetired("rank " + std::to_string(r.rank()) + " of it did not survive (" + st.message() + ")");
      return Status::Ok();
    }
  }
  for (const proto::VersionRecord& v : rec->versions()) back.versions.emplace(v.step(), v);
  retired_ = std::move(back);
  MEMENTO_LOG(kInfo) << "re-attached the retired layout of world size " << retired_.world_size << ": "
                     << retired_.ranks.size() << " ranks, " << retired_.versions.size() << " versions";
  return Status::Ok();
}

Status NodeState::PersistRetired() {
  proto::RetiredRecord rec;
  rec.set_world_size(retired_.world_size);
  for (const auto& [r, rs] : retired_.ranks) *rec.add_ranks() = rs.record;
  for (const auto& [step, v] : retired_.versions) *rec.add_versions() = v;
  for (const auto& seg : retired_.spares) rec.add_spare_slot_names(seg->name());
  return catalog_->PutRetired(rec);
}

void NodeState::DropRetired(const std::string& why) {
  if (retired_.empty() && retired_.versions.empty() && retired_.spares.empty()) return;
  std::string steps;
  for (const auto& [step, v] : retired_.versions) steps += (steps.empty() ? "" : ", ") + std::to_string(step);
  MEMENTO_LOG(kInfo) << "dropping the retired layout (world size " << retired_.world_size << ", versions "
                     << (steps.empty() ? "none" : steps) << "): " << why;
  for (auto& [r, rs] : retired_.ranks) {
    slot_bytes_in_use_ -= rs.record.slot_bytes() * rs.held();
    ReleaseSlots(&rs);
  }
  for (const auto& seg : retired_.spares) {
    slot_bytes_in_use_ -= seg->size();
    SharedMemory::Unlink(seg->name()).IgnoreError();
  }
  retired_ = Retired{};
  retired_valid_.clear();
  reshard_point_ = -1;
  catalog_->DeleteRetired().IgnoreError();
}

Status NodeState::RetireLayout(const std::set<int32_t>& keep) {
  DropRetired("a newer layout is retired");
  Retired next;
  for (const auto& [step, v] : versions_) {
    if (v.state() == proto::VERSION_LOCALLY_COMPLETE || v.state() == proto::VERSION_GLOBALLY_COMPLETE) {
      next.versions.emplace(step, v);
    }
  }
  std::set<int32_t> used_slots;
  for (const auto& [step, v] : next.versions) used_slots.insert(v.slot_index());
  std::vector<std::pair<int32_t, size_t>> spare_of;  // next.spares[i] was slot .second of rank .first
  std::set<int32_t> capturing;  // an old rank may still write into these: never spares
  for (const auto& [step, v] : versions_) {
    if (!next.versions.count(step)) capturing.insert(v.slot_index());
  }
  for (auto it = ranks_.begin(); it != ranks_.end();) {
    const int32_t r = it->first;
    if (!keep.count(r)) {
      next.world_size = std::max(next.world_size, it->second.record.world_size());
      // The segments that hold a version move to the retired layout as they are; the others
      // become spares, which the new layout's slots reuse (their pages are reserved already).
      RankSlots& moved = it->second;
      for (size_t k = 0; k < moved.slots.size(); ++k) {
        if (used_slots.count(static_cast<int32_t>(k)) || moved.slots[k] == nullptr) continue;
        if (capturing.count(static_cast<int32_t>(k)) || moved.slots[k].use_count() > 1) {
          SharedMemory::Unlink(moved.slots[k]->name()).IgnoreError();
          slot_bytes_in_use_ -= moved.record.slot_bytes();
        } else {
          next.spares.push_back(std::move(moved.slots[k]));
          spare_of.emplace_back(r, k);
        }
        moved.slots[k].reset();
        moved.record.set_slot_names(static_cast<int>(k), "");
      }
      next.ranks.emplace(r, std::move(moved));
      catalog_->DeleteRank(r).IgnoreError();
      it = ranks_.erase(it);
      continue;
    }
    // A rank of this registration round that kept its slots: the retired layout gets a copy of the
    // slots its versions use (the rank's next captures overwrite the originals).
    RankSlots copy;
    copy.record = it->second.record;
    copy.record.clear_slot_names();
    for (size_t k = 0; k < it->second.slots.size(); ++k) {
      if (!used_slots.count(static_cast<int32_t>(k))) {  // holds no version: not copied
        copy.record.add_slot_names("");
        copy.slots.push_back(nullptr);
        continue;
      }
      const SharedMemory& from = *it->second.slots[k];
      std::string name = from.name() + "-x";
      for (int g = 1; RetiredHoldsName(name) || SharedMemory::Exists(name); ++g) {
        name = from.name() + "-x" + std::to_string(g);
      }
      auto seg = SharedMemory::Create(name, from.size());
      if (!seg.ok()) {
        ReleaseSlots(&copy);
        // Undo: the spares go back to the ranks they came from.
        for (size_t i = 0; i < next.spares.size(); ++i) {
          RankSlots& owner = next.ranks[spare_of[i].first];
          owner.record.set_slot_names(static_cast<int>(spare_of[i].second), next.spares[i]->name());
          owner.slots[spare_of[i].second] = std::move(next.spares[i]);
        }
        for (auto& [rr, rs] : next.ranks) {
          catalog_->PutRank(rs.record).IgnoreError();
          ranks_.emplace(rr, std::move(rs));
        }
        return seg.status().WithContext("rank " + std::to_string(r) + ": copying slot " + std::to_string(k) +
                                        " for the retired layout");
      }
      std::memcpy((*seg)->data(), from.data(), from.size());
      copy.record.add_slot_names(name);
      copy.slots.push_back(std::move(seg).value());
    }
    slot_bytes_in_use_ += copy.record.slot_bytes() * copy.held();
    next.ranks.emplace(r, std::move(copy));
    ++it;
  }
  for (const auto& [step, v] : versions_) catalog_->DeleteVersion(step).IgnoreError();
  versions_.clear();
  retired_ = std::move(next);
  retired_valid_.clear();
  reshard_point_ = -1;
  return PersistRetired();
}

int64_t NodeState::PlanMemoryReshard(const std::vector<TickPayload>& all, std::string* why, int32_t* world_out) const {
  int32_t world = 0, holders = 0, cuda = 0, registered = 0;
  int64_t ranks = 0;
  std::map<int64_t, int> count;
  for (const TickPayload& p : all) {
    cuda += p.cuda_registered;
    registered += p.registered;
    if (p.retired_ranks == 0) continue;
    ++holders;
    ranks += p.retired_ranks;
    if (world != 0 && world != p.retired_world) {
      *why = "nodes hold retired layouts of different world sizes (" + std::to_string(world) + " and " +
             std::to_string(p.retired_world) + ")";
      return -1;
    }
    world = p.retired_world;
    if (p.registered == 0) {
      *why = "node " + std::to_string(p.node_id) + " holds part of it but runs no rank of the new layout to serve it";
      return -1;
    }
    for (int i = 0; i < p.n_retired && i < TickPayload::kMaxListed; ++i) ++count[p.retired[i]];
  }
  if (holders == 0) return -1;
  if (ranks != world) {
    *why = "the nodes hold " + std::to_string(ranks) + " of its " + std::to_string(world) +
           " ranks (the others' memory was lost)";
    return -1;
  }
  if (cuda != registered) {
    *why = std::to_string(registered - cuda) + " of the new layout's " + std::to_string(registered) +
           " ranks registered no CUDA tensor (resharding in memory runs over NCCL)";
    return -1;
  }
  *world_out = world;
  for (auto it = count.rbegin(); it != count.rend(); ++it) {
    if (it->second == holders) return it->first;
  }
  *why = "no version of it is intact on every node that holds a part of it";
  return -1;
}

Result<proto::NcclIdReply> NodeState::NcclId(Session* session, const std::string& id, int timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  MEMENTO_RETURN_IF_ERROR(CheckSessionInEpoch(*session));
  const std::string who = "rank " + std::to_string(session->rank);
  if (!id.empty()) {
    if (session->rank != 0) return InvalidArgument(who + ": only rank 0 sends the NCCL id");
    if (id.size() > sizeof(TickPayload::nccl_id)) {
      return InvalidArgument(who + ": an NCCL id of " + std::to_string(id.size()) + " bytes (at most " +
                             std::to_string(sizeof(TickPayload::nccl_id)) + ")");
    }
    nccl_id_ = id;
    nccl_id_incarnation_ = incarnation_;
    cv_.notify_all();  // the other ranks of this node wait for it here
  }
  const uint64_t serial = session->registration_serial;
  const bool ok = cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] {
    return serial != registration_serial_ || (nccl_id_incarnation_ == incarnation_ && !nccl_id_.empty());
  });
  MEMENTO_RETURN_IF_ERROR(CheckSessionInEpoch(*session));
  if (!ok) {
    return Timeout(who + ": waited " + std::to_string(timeout_ms) + " ms for rank 0's NCCL id");
  }
  proto::NcclIdReply reply;
  reply.set_id(nccl_id_);
  return reply;
}

}  // namespace memento
