// Flusher: one job at a time on a worker thread; the native format in ucp_format/.
#include "agent/flusher.h"

#include <algorithm>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>

#include "core/crc.h"
#include "core/kill_point.h"
#include "core/log.h"
#include "proto/version.h"
#include "ucp_format/native_checkpoint.h"
#include "ucp_format/universal.h"

namespace memento {

Flusher::Flusher(const AgentOptions& options, FileSystem* fs, int node_id)
    : options_(options), fs_(fs), node_id_(node_id) {}

Flusher::~Flusher() {
  if (worker_.joinable()) worker_.join();
}

std::string Flusher::JobDir() const { return memento::JobDir(options_.storage_root, options_.job_id); }
std::string Flusher::StepDir(int64_t step) const {
  return CheckpointDir(options_.storage_root, options_.job_id, step);
}

std::string Flusher::SourceDir(int64_t step) const {
  if (step == restore_from_step_ && !fs_->Exists(StepDir(step) + "/manifest")) return options_.restore_from;
  return StepDir(step);
}

Status Flusher::OpenRestoreSource() {
  if (options_.restore_from.empty()) return Status::Ok();
  const std::string& dir = options_.restore_from;
  if (Result<proto::UniversalManifest> u = ReadUniversalManifest(fs_, dir); u.ok()) {
    restore_from_step_ = u->source().step();
  } else if (Result<proto::Manifest> n = ReadManifest(fs_, dir); n.ok()) {
    restore_from_step_ = n->step();
  } else {
    return InvalidArgument("--restore-from " + dir + " is neither a universal checkpoint (" + u.status().message() +
                           ") nor a committed native one (" + n.status().message() + ")");
  }
  MEMENTO_LOG(kInfo) << "resuming from " << dir << " (step " << restore_from_step_
                     << ") when memory and storage hold nothing newer";
  return Status::Ok();
}

void Flusher::Run(int64_t step, std::function<Status()> job, State done, State failed) {
  if (worker_.joinable()) worker_.join();
  worker_ = std::thread([this, step, job = std::move(job), done, failed] {
    // Storage work is background work: below the copy and agreement threads on small machines.
    const id_t tid = static_cast<id_t>(::syscall(SYS_gettid));
    (void)::setpriority(PRIO_PROCESS, tid, ::getpriority(PRIO_PROCESS, tid) + 10);
    Status st = job();
    {
      std::lock_guard<std::mutex> lock(mu_);
      progress_.step = step;
      progress_.state = st.ok() ? done : failed;
      progress_.error = st.ok() ? "" : st.message();
    }
    // After a commit is reported: retention never delays it.
    if (st.ok() && done == State::kCommitted) ApplyRetention(step);
  });
}

void Flusher::StartWrite(int64_t step, int32_t world_size, std::vector<RankJob> ranks) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    progress_ = {step, State::kWriting, ""};
  }
  Run(step, [this, step, world_size, ranks = std::move(ranks)] { return WriteRanks(step, world_size, ranks); },
      State::kWritten, State::kFailed);
}

void Flusher::StartCommit(int64_t step, int32_t world_size) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    progress_ = {step, State::kCommitting, ""};
  }
  Run(step, [this, step, world_size] { return Commit(step, world_size); }, State::kCommitted, State::kCommitFailed);
}

Flusher::Progress Flusher::progress() const {
  std::lock_guard<std::mutex> lock(mu_);
  return progress_;
}

bool Flusher::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  if (progress_.state == State::kWriting || progress_.state == State::kCommitting) return false;
  progress_ = Progress{};
  return true;
}

Status Flusher::WriteRanks(int64_t step, int32_t world_size, const std::vector<RankJob>& ranks) {
  const std::string dir = StepDir(step);
  MEMENTO_RETURN_IF_ERROR(fs_->CreateDirs(dir));
  PersistOptions po;
  if (options_.flush_bandwidth_mbps > 0) po.bandwidth_bytes_per_s = options_.flush_bandwidth_mbps * 1e6;
  po.piece_bytes = options_.flush_piece_bytes;
  // One queued write at most: when captures start, the flush gets out of the way within one piece.
  po.write.max_queued_writes = 1;
  if (busy_) {
    // While captures are in flight the writer waits before each piece. A wait that reaches 200 ms
    // (captures back to back) lets the next 16 MiB go without waiting: however busy the training
    // ranks keep the node, the flush still moves at least 80 MB/s.
    constexpr uint64_t kStarvedBytes = uint64_t{16} << 20;
    const uint64_t piece = po.piece_bytes;
    po.yield = [this, piece, credit = std::make_shared<uint64_t>(0)] {
      if (*credit >= piece) {
        *credit -= piece;
        return;
      }
      int waited = 0;
      while (waited < 200 && busy_()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        ++waited;
      }
      if (waited == 200) *credit = kStarvedBytes > piece ? kStarvedBytes - piece : 0;
    };
  }
  auto t0 = std::chrono::steady_clock::now();
  uint64_t bytes = 0;
  for (size_t i = 0; i < ranks.size(); ++i) {
    const RankJob& job = ranks[i];
    RankImage image;
    image.rank = job.layout.rank();
    image.world_size = world_size;
    image.layout = &job.layout;
    image.slot = job.slot->data();
    image.region_crcs = &job.crcs;
    auto entry = WriteRankFiles(fs_, dir, options_.job_id, step, image, po);
    if (!entry.ok()) {
      Status st = entry.status().WithContext("flushing step " + std::to_string(step) + " of rank " +
                                             std::to_string(image.rank));
      MEMENTO_LOG(kError) << st.message();
      return st;
    }
    bytes += entry->data_bytes();
    if (i == 0) KillPoint("agent.flush_mid_write", node_id_, step);
  }
  MEMENTO_RETURN_IF_ERROR(fs_->SyncDir(dir));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  MEMENTO_LOG(kInfo) << "step " << step << ": " << ranks.size() << " ranks written to " << dir << " ("
                     << FormatBytes(bytes) << " in " << s << " s)";
  return Status::Ok();
}

Status Flusher::Commit(int64_t step, int32_t world_size) {
  const std::string dir = StepDir(step);
  // Every agent's files are durable: the manifest entries come from the metadata files on storage.
  std::vector<proto::ManifestRank> ranks;
  for (int32_t r = 0; r < world_size; ++r) {
    const std::string meta_name = MetaFileName(r);
    auto meta = ReadFileToString(fs_, dir + "/" + meta_name);
    if (!meta.ok()) return meta.status().WithContext("committing step " + std::to_string(step));
    proto::RankMetadata md;
    if (!md.ParseFromString(*meta)) return DataLoss(dir + "/" + meta_name + ": malformed rank metadata");
    proto::ManifestRank e;
    e.set_rank(r);
    e.set_meta_file(meta_name);
    e.set_data_file(md.data_file());
    e.set_data_bytes(md.data_bytes());
    e.set_meta_crc(Crc64(meta->data(), meta->size()));
    ranks.push_back(std::move(e));
  }
  proto::Manifest m = BuildManifest(options_.job_id, step, world_size, std::move(ranks));
  const uint64_t total = m.total_bytes();
  MEMENTO_RETURN_IF_ERROR(CommitManifest(fs_, dir, m));
  MEMENTO_LOG(kInfo) << "step " << step << " committed: " << dir << " (" << FormatBytes(total) << ", " << world_size
                     << " ranks)";
  return Status::Ok();
}

void Flusher::ApplyRetention(int64_t step) {
  // Keep the newest keep_persisted committed checkpoints; drop stale partial ones below `step`.
  auto list = ListCheckpoints(fs_, JobDir());
  if (!list.ok()) return;
  std::vector<int64_t> committed;
  for (const auto& c : *list) {
    if (c.committed) committed.push_back(c.step);
  }
  std::sort(committed.rbegin(), committed.rend());
  const size_t keep = static_cast<size_t>(std::max(1, options_.keep_persisted));
  for (size_t i = keep; i < committed.size(); ++i) {
    if (committed[i] >= step) continue;
    MEMENTO_LOG(kInfo) << "retention: removing step " << committed[i];
    fs_->RemoveAll(StepDir(committed[i])).IgnoreError();
  }
  for (const auto& c : *list) {
    if (!c.committed && c.step < step) {
      MEMENTO_LOG(kInfo) << "removing partial checkpoint " << c.dir;
      fs_->RemoveAll(c.dir).IgnoreError();
    }
  }
}

Status Flusher::RemovePartial() {
  auto list = ListCheckpoints(fs_, JobDir());
  if (!list.ok()) return list.status().code() == StatusCode::kNotFound ? Status::Ok() : list.status();
  for (const auto& c : *list) {
    if (c.committed) continue;
    MEMENTO_LOG(kInfo) << "removing partial checkpoint " << c.dir << " (no manifest: never committed)";
    MEMENTO_RETURN_IF_ERROR(fs_->RemoveAll(c.dir));
  }
  return Status::Ok();
}

std::vector<int64_t> Flusher::CommittedSteps(int n) {
  std::vector<int64_t> out;
  auto list = ListCheckpoints(fs_, JobDir());
  if (list.ok()) {
    for (auto it = list->rbegin(); it != list->rend(); ++it) {
      if (it->committed) out.push_back(it->step);
    }
  }
  if (restore_from_step_ >= 0 && std::find(out.begin(), out.end(), restore_from_step_) == out.end()) {
    out.push_back(restore_from_step_);
    std::sort(out.rbegin(), out.rend());
  }
  if (static_cast<int>(out.size()) > n) out.resize(static_cast<size_t>(std::max(n, 0)));
  return out;
}

Status Flusher::Load(int64_t step, const proto::RankRecord& layout, uint8_t* slot) {
  const std::string dir = SourceDir(step);
  if (dir != StepDir(step)) return LoadRankResharded(fs_, dir, layout, slot);  // --restore-from
  MEMENTO_ASSIGN_OR_RETURN(proto::Manifest m, ReadManifest(fs_, dir));
  Status st = LoadRank(fs_, dir, m, layout, slot);
  if (st.code() != StatusCode::kFailedPrecondition) return st;
  // A layout LoadRank cannot fill as is (vocab padded differently): the universal loader cuts and
  // re-pads. When it cannot either, LoadRank's reason stands.
  return LoadRankResharded(fs_, dir, layout, slot).ok() ? Status::Ok() : st;
}

}  // namespace memento
