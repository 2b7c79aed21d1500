// The client library: handshake, registration, lazy asynchronous capture into the agent's slots
// (host path: chunked multi-threaded copy; CUDA path: pinned slots, a copy stream and events),
// and restore. See client.h for the contract.
#include "snapshot/client.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <thread>

#include "core/env.h"
#include "core/heartbeat.h"
#include "core/kill_point.h"
#include "core/log.h"
#include "core/posix_error.h"
#include "core/shared_memory.h"
#include "core/thread_pool.h"
#include "proto/memento.pb.h"
#include "proto/shard_convert.h"
#include "proto/version.h"
#include "proto/wire.h"
#include "snapshot/cuda_copier.h"
#include "snapshot/memory_reshard.h"

namespace memento {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

int EnvInt(const char* name, int def) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::atoi(v) : def;
}

// Registration chunks for cudaHostRegister; copies never straddle two of them.
constexpr size_t kPinChunk = size_t{64} << 20;

// Lets the background pinning pause between slices while a holder needs the driver.
class PinGate {
 public:
  class Hold {
   public:
    explicit Hold(PinGate* g) : g_(g) {
      if (g_ == nullptr) return;
      std::lock_guard<std::mutex> lock(g_->mu_);
      ++g_->holds_;
    }
    ~Hold() { Release(); }
    // Lets the pinning go on before the hold is destroyed; once only.
    void Release() {
      if (g_ == nullptr) return;
      std::lock_guard<std::mutex> lock(g_->mu_);
      if (released_) return;
      released_ = true;
      if (--g_->holds_ == 0) g_->cv_.notify_all();
    }
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;

   private:
    PinGate* g_;
    bool released_ = false;  // guarded by g_->mu_
  };
  // Returns once no one holds the gate.
  void Pass() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return holds_ == 0; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int holds_ = 0;
};

struct TensorEntry {
  std::string name;
  void* data = nullptr;
  DType dtype = DType::kInvalid;
  ShardSpec spec;
  size_t bytes = 0;
  MemoryKind where = MemoryKind::kHost;
  int device = 0;
  uint64_t slot_offset = 0;
};

// What the agent is told of a registered tensor.
proto::TensorRecord TensorRecordOf(const TensorEntry& t) {
  proto::TensorRecord tr;
  tr.set_name(t.name);
  tr.set_dtype(static_cast<int32_t>(t.dtype));
  ToProto(t.spec, tr.mutable_spec());
  tr.set_bytes(t.bytes);
  tr.set_memory_kind(static_cast<int32_t>(t.where));
  return tr;
}

struct BlobEntry {
  std::string name;
  void* data = nullptr;
  size_t capacity = 0;
  size_t* size = nullptr;
  uint64_t slot_offset = 0;
  std::string staged;  // copied in Snapshot(), written to the slot in the background
};

class ClientImpl : public Client {
 public:
  ClientImpl(ClientOptions o, int fd) : opts_(std::move(o)), fd_(fd) {
    copy_pool_ = std::make_unique<ThreadPool>(opts_.copy_threads);
    worker_ = std::make_unique<ThreadPool>(1);
  }
  ~ClientImpl() override {
    reshard_prep_.reset();
    if (releasing_.valid()) releasing_.wait();
    if (pinning_.valid()) pinning_.wait();
    if (inflight_.valid()) inflight_.wait();
    Beat(BeatPhase::kClosed, last_step_);
    worker_.reset();
    copy_pool_.reset();
    for (auto& [dev, c] : copiers_) {
      for (auto& seg : slots_) c->UnregisterHost(seg->data(), seg->size(), kPinChunk);
    }
    if (fd_ >= 0) ::close(fd_);
  }

  Status Handshake() {
    proto::Request req;
    proto::Hello* h = req.mutable_hello();
    h->set_protocol_version(kAgentProtocolVersion);
    h->set_job_id(opts_.job_id);
    h->set_job_token(opts_.job_token);
    h->set_rank(opts_.rank);
    h->set_local_rank(opts_.local_rank);
    h->set_world_size(opts_.world_size);
    h->set_node_id(opts_.node_id);
    h->set_pid(static_cast<int32_t>(::getpid()));
    h->set_library_version(kLibraryVersion);
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply reply, Call(req));
    node_id_ = reply.hello().node_id();
    reshard_likely_ = reply.hello().reshard_likely();
    Beat(BeatPhase::kConnected, -1);
    return Status::Ok();
  }

  Status RegisterTensor(const std::string& name, void* data, DType dtype, const ShardSpec& spec, MemoryKind where,
                        int cuda_device) override {
    return RegisterTensor(name, data, static_cast<size_t>(spec.local_numel) * DTypeSize(dtype), dtype, spec, where,
                          cuda_device);
  }

  Status RegisterTensor(const std::string& name, void* data, size_t buffer_bytes, DType dtype, const ShardSpec& spec,
                        MemoryKind where, int cuda_device) override {
    if (finished_) return FailedPrecondition("tensor '" + name + "' registered after FinishRegistration()");
    if (data == nullptr && buffer_bytes > 0) return InvalidArgument("tensor '" + name + "' has a null buffer");
    if (DTypeSize(dtype) == 0) {
      return InvalidArgument("tensor '" + name + "' has unknown dtype code " + std::to_string(static_cast<int>(dtype)));
    }
    if (where == MemoryKind::kCuda) {
      Status avail = CudaCopier::Available();
      if (!avail.ok()) return avail.WithContext("tensor '" + name + "' is on a CUDA device");
    }
    TensorEntry t;
    t.name = name;
    t.data = data;
    t.dtype = dtype;
    t.spec = spec;
    t.bytes = buffer_bytes;
    t.where = where;
    t.device = cuda_device;
    tensors_.push_back(std::move(t));
    // The agent holds versions of CUDA ranks (the handshake's hint): should this layout differ, the
    // restore reshards them over NCCL. Its set-up starts with the first CUDA tensor, overlapping the
    // rest of the registration (dropped in the background when the registration reply says no).
    if (where == MemoryKind::kCuda && reshard_likely_ && reshard_prep_ == nullptr && ReshardPrepWanted()) {
      StartReshardPrep(cuda_device);
    }
    return Status::Ok();
  }

  Status RegisterBlob(const std::string& name, void* data, size_t capacity, size_t* size) override {
    if (finished_) return FailedPrecondition("blob '" + name + "' registered after FinishRegistration()");
    if (data == nullptr || size == nullptr) return InvalidArgument("blob '" + name + "' needs a buffer and a size");
    BlobEntry b;
    b.name = name;
    b.data = data;
    b.capacity = capacity;
    b.size = size;
    blobs_.push_back(std::move(b));
    return Status::Ok();
  }

  Status FinishRegistration() override {
    if (finished_) return Status::Ok();
    const auto t_register = Clock::now();
    proto::Request req;
    proto::RegisterRequest* r = req.mutable_register_request();
    for (const TensorEntry& t : tensors_) *r->add_tensors() = TensorRecordOf(t);
    for (const BlobEntry& b : blobs_) {
      proto::BlobRecord* br = r->add_blobs();
      br->set_name(b.name);
      br->set_capacity(b.capacity);
    }
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply reply, Call(req));
    const proto::RegisterReply& rr = reply.register_reply();
    if (rr.tensors_size() != static_cast<int>(tensors_.size()) || rr.blobs_size() != static_cast<int>(blobs_.size())) {
      return Internal("agent answered the registration with a different number of tensors");
    }
    for (size_t i = 0; i < tensors_.size(); ++i) tensors_[i].slot_offset = rr.tensors(static_cast<int>(i)).slot_offset();
    for (size_t i = 0; i < blobs_.size(); ++i) blobs_[i].slot_offset = rr.blobs(static_cast<int>(i)).slot_offset();
    std::vector<int> devices;
    for (const TensorEntry& t : tensors_) {
      if (t.where == MemoryKind::kCuda && std::find(devices.begin(), devices.end(), t.device) == devices.end()) {
        devices.push_back(t.device);
      }
    }
    // The agent retired an earlier layout: the restore may reshard it over NCCL. Its set-up (NCCL's
    // initialisation, the buffers) runs during the wait, ahead of the slots' pinning (both wait on
    // the driver): started at the first CUDA tensor on the handshake's hint, else now.
    // MEMENTO_RESHARD_PREP=0 turns that off (diagnostics).
    if (!rr.reshard_candidate()) {
      // Started on the agent's hint and not needed: the pinning goes on at once, the set-up ends
      // and is dropped in the background.
      if (prep_hold_ != nullptr) prep_hold_->Release();
      Release(std::move(reshard_prep_));
    } else if (reshard_prep_ == nullptr && !devices.empty() && ReshardPrepWanted()) {
      StartReshardPrep(devices[0]);
    }
    const auto t_map = Clock::now();
    // Host-only ranks map their slots' pages now (MAP_POPULATE), so that the first snapshot does
    // not fault them in. A rank with CUDA tensors leaves that to the background pinning
    // (cudaHostRegister faults the pages in): populating 6.4 GB of slots took 2.7-6.7 s of the
    // registration on the H200 machine. MEMENTO_POPULATE_SLOTS=1 populates anyway (diagnostics).
    const bool populate = devices.empty() || EnvInt("MEMENTO_POPULATE_SLOTS", 0) != 0;
    slots_.clear();
    for (const std::string& name : rr.slot_names()) {
      MEMENTO_ASSIGN_OR_RETURN(auto seg, SharedMemory::Open(name, rr.slot_bytes(), /*writable=*/true, populate));
      slots_.push_back(std::move(seg));
    }
    // Pin the slots for every device that holds a registered tensor: about half a second per GiB,
    // so it runs in the background, overlapping the wait for the job's other ranks.
    if (!devices.empty()) {
      pinning_ = std::async(std::launch::async, [this, devices]() -> Status {
        const int threads = std::clamp(static_cast<int>(std::thread::hardware_concurrency()) / 2, 2, 8);
        for (int dev : devices) {
          MEMENTO_ASSIGN_OR_RETURN(auto copier, CudaCopier::Create(dev));
          const auto t0 = Clock::now();
          // A slice at a time: a resharded restore pauses the pinning between slices (its own
          // pinned buffers and the NCCL communicator's set-up wait on the same driver).
          const size_t slice = kPinChunk * static_cast<size_t>(threads);
          for (auto& seg : slots_) {
            for (size_t off = 0; off < seg->size(); off += slice) {
              pin_gate_.Pass();
              MEMENTO_RETURN_IF_ERROR(
                  copier->RegisterHost(seg->data() + off, std::min(slice, seg->size() - off), kPinChunk, threads));
            }
          }
          MEMENTO_LOG(kDebug) << "rank " << opts_.rank << ": pinned " << slots_.size() << " slots for device " << dev
                              << " in " << Seconds(t0, Clock::now()) << " s";
          copiers_[dev] = std::move(copier);
        }
        return Status::Ok();
      });
    }
    finished_ = true;
    const auto t_await = Clock::now();
    Beat(BeatPhase::kRegistered, -1);
    // Collective: wait for every rank of the job.
    proto::Request await;
    await.mutable_await_epoch()->set_timeout_ms(opts_.registration_timeout_ms);
    Result<proto::Reply> awaited = [&] {
      HeartbeatSender::KeepAlive alive(heartbeat_.get(), -1);  // agreement, rebuilds, storage loads
      return Call(await);
    }();
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply er, std::move(awaited));
    MEMENTO_LOG(kDebug) << "rank " << opts_.rank << ": registered in " << Seconds(t_register, t_map)
                        << " s, slots mapped in " << Seconds(t_map, t_await) << " s, the job's epoch after "
                        << Seconds(t_await, Clock::now()) << " s more";
    Beat(BeatPhase::kReady, -1);
    incarnation_ = er.await_epoch().incarnation();
    for (const auto& s : er.await_epoch().refused()) {
      MEMENTO_LOG(kDebug) << "rank " << opts_.rank << ": " << s;  // Restore() returns them too
    }
    return Status::Ok();
  }

  Status Snapshot(int64_t step) override {
    auto t0 = Clock::now();
    MEMENTO_RETURN_IF_ERROR(FinishRegistration());
    Release(std::move(reshard_prep_));  // no resharded restore came
    MEMENTO_RETURN_IF_ERROR(AwaitPinning());
    if (inflight_.valid()) MEMENTO_RETURN_IF_ERROR(WaitUntilSafeToUpdate());
    MEMENTO_RETURN_IF_ERROR(TakeReportError());
    // Blobs are small and the caller may change them right after this call: stage them now.
    for (BlobEntry& b : blobs_) {
      if (*b.size > b.capacity) {
        return InvalidArgument("blob '" + b.name + "' holds " + std::to_string(*b.size) + " bytes, more than its capacity of " +
                               std::to_string(b.capacity));
      }
      b.staged.assign(static_cast<const char*>(b.data), *b.size);
    }
    for (auto& [dev, c] : copiers_) MEMENTO_RETURN_IF_ERROR(c->RecordProducer(opts_.cuda_stream));
    auto done = std::make_shared<std::promise<Status>>();
    inflight_ = done->get_future();
    inflight_step_ = step;
    snapshot_started_ = t0;
    worker_->Submit([this, step, done, t0] { Capture(step, done, t0); });
    stats_.snapshot_call_seconds = Seconds(t0, Clock::now());
    last_step_ = step;
    Beat(BeatPhase::kStep, step);
    return Status::Ok();
  }

  Status WaitUntilSafeToUpdate() override {
    if (!inflight_.valid()) return Status::Ok();
    auto t0 = Clock::now();
    Status st;
    if (inflight_.wait_for(std::chrono::milliseconds(200)) == std::future_status::ready) {
      st = inflight_.get();
    } else {
      // The copy waits for the agent (a slot held by the encoder or the flusher, under load): the
      // rank is alive and says so, and a stuck agent ends the wait with the slot timeout's error,
      // which names what holds the slots.
      HeartbeatSender::KeepAlive alive(heartbeat_.get(), inflight_step_);
      st = inflight_.get();
    }
    stats_.wait_seconds = Seconds(t0, Clock::now());
    stats_.step = inflight_step_;
    stats_.copy_seconds = copy_seconds_.load();
    stats_.bytes = copy_bytes_.load();
    Beat(BeatPhase::kStep, last_step_);
    return st;
  }

  Result<RestoreResult> Restore(int64_t step) override {
    MEMENTO_RETURN_IF_ERROR(FinishRegistration());
    if (inflight_.valid()) MEMENTO_RETURN_IF_ERROR(WaitUntilSafeToUpdate());
    Drain();
    proto::Request req;
    req.mutable_restore()->set_step(step);
    Result<proto::Reply> called = [&] {
      HeartbeatSender::KeepAlive alive(heartbeat_.get(), -1);
      return Call(req);
    }();
    if (!called.ok() || !called->restore().has_memory_reshard()) Release(std::move(reshard_prep_));
    if (!called.ok() && called.status().code() == StatusCode::kNotFound) {
      Beat(BeatPhase::kRestored, -1, "nothing to restore: " + called.status().message());
    }
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply reply, std::move(called));
    const proto::RestoreReply& rr = reply.restore();
    if (rr.has_memory_reshard()) return RestoreResharded(rr);  // the slots need not be pinned for it
    MEMENTO_RETURN_IF_ERROR(AwaitPinning());
    if (rr.slot_index() < 0 || rr.slot_index() >= static_cast<int>(slots_.size())) {
      return Internal("agent named slot " + std::to_string(rr.slot_index()) + " for the restore");
    }
    const uint8_t* base = slots_[rr.slot_index()]->data();
    // Blobs first: validate before touching any buffer.
    for (const BlobEntry& b : blobs_) {
      uint64_t len = 0;
      std::memcpy(&len, base + b.slot_offset, 8);
      if (len > b.capacity) {
        return DataLoss("blob '" + b.name + "' of step " + std::to_string(rr.step()) + " claims " + std::to_string(len) +
                        " bytes, more than its capacity of " + std::to_string(b.capacity));
      }
    }
    TaskGroup group;
    std::mutex err_mu;
    Status err;
    for (const TensorEntry& t : tensors_) {
      const uint8_t* src = base + t.slot_offset;
      if (t.where == MemoryKind::kCuda) {
        CudaCopier* c = copiers_.at(t.device).get();
        MEMENTO_RETURN_IF_ERROR(ForEachPinnedPiece(t, [&](size_t off, size_t n) {
          return c->EnqueueH2D(static_cast<uint8_t*>(t.data) + off, src + off, n);
        }));
        continue;
      }
      for (size_t off = 0; off < t.bytes; off += opts_.copy_chunk_bytes) {
        const size_t n = std::min(opts_.copy_chunk_bytes, t.bytes - off);
        group.Add();
        copy_pool_->Submit([&, src, off, n, dst = static_cast<uint8_t*>(t.data)] {
          std::memcpy(dst + off, src + off, n);
          group.Done();
        });
      }
    }
    group.Wait();
    for (auto& [dev, c] : copiers_) MEMENTO_RETURN_IF_ERROR(c->Synchronize());
    for (const BlobEntry& b : blobs_) {
      uint64_t len = 0;
      std::memcpy(&len, base + b.slot_offset, 8);
      std::memcpy(b.data, base + b.slot_offset + 8, len);
      *b.size = len;
    }
    return Restored(rr);
  }

  // The result of a restore the buffers now hold.
  RestoreResult Restored(const proto::RestoreReply& rr) {
    RestoreResult result;
    result.step = rr.step();
    result.refused.assign(rr.refused().begin(), rr.refused().end());
    result.source = rr.source();
    last_step_ = result.step;
    Beat(BeatPhase::kRestored, result.step, result.source);
    return result;
  }

  // The version is held in memory in an earlier layout: the ranks reshard it over NCCL.
  Result<RestoreResult> RestoreResharded(const proto::RestoreReply& rr) {
    MemoryReshardIo io;
    io.rank = opts_.rank;
    io.world_size = opts_.world_size;
    for (const TensorEntry& t : tensors_) {
      *io.registration.add_tensors() = TensorRecordOf(t);
      io.tensors.push_back({t.data, t.bytes, t.where == MemoryKind::kCuda, t.device});
    }
    for (const BlobEntry& b : blobs_) io.blobs.push_back({b.name, b.data, b.capacity, b.size});
    io.exchange_id = [this](const std::string& id) -> Result<std::string> {
      proto::Request req;
      req.mutable_nccl_id()->set_id(id);
      req.mutable_nccl_id()->set_timeout_ms(opts_.registration_timeout_ms);
      MEMENTO_ASSIGN_OR_RETURN(proto::Reply reply, Call(req));
      return reply.nccl_id().id();
    };
    // MEMENTO_RESHARD_CHUNK_BYTES (tests): bytes per peer and round; default from the world size.
    if (const char* c = std::getenv("MEMENTO_RESHARD_CHUNK_BYTES")) io.chunk_bytes = std::strtoull(c, nullptr, 10);
    // MEMENTO_RESHARD_NCCL_CHANNELS: the communicator's most channels (default 4; 0 = NCCL's choice).
    io.nccl_channels = EnvInt("MEMENTO_RESHARD_NCCL_CHANNELS", 4);
    io.pool_threads = std::clamp(static_cast<int>(std::thread::hardware_concurrency()) / 2, 4, 16);
    ThreadPool pool(io.pool_threads);
    io.pool = &pool;
    io.prep = std::move(reshard_prep_);
    // The communicator and the buffers are released after Restore() returns.
    std::shared_ptr<void> leftovers;
    io.leftovers = &leftovers;
    MemoryReshardStats stats;
    {
      HeartbeatSender::KeepAlive alive(heartbeat_.get(), -1);
      // The slots' pinning (needed by the first snapshot, not here) waits until the data is in.
      // MEMENTO_RESHARD_PINNING (diagnostics): "overlap" lets it run alongside, "await" finishes
      // it first.
      const char* pin_mode = std::getenv("MEMENTO_RESHARD_PINNING");
      const std::string mode = pin_mode != nullptr ? pin_mode : "pause";
      if (mode == "await") MEMENTO_RETURN_IF_ERROR(AwaitPinning());
      PinGate::Hold hold(mode == "pause" ? &pin_gate_ : nullptr);
      Status st = RunMemoryReshard(rr.memory_reshard(), io, &stats);
      io.prep.reset();
      Release(std::move(leftovers));
      if (!st.ok()) {
        return st.WithContext("rank " + std::to_string(opts_.rank) + ": restoring step " + std::to_string(rr.step()) +
                              " of the earlier layout from memory");
      }
    }
    last_reshard_ = stats;
    return Restored(rr);
  }

  Result<std::vector<VersionInfo>> ListVersions() override {
    proto::Request req;
    req.mutable_list_versions();
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply reply, Call(req));
    std::vector<VersionInfo> out;
    for (const auto& v : reply.list_versions().versions()) {
      out.push_back({v.step(), v.state(), v.captured_ranks(), v.local_ranks(), v.persisted(), v.flush_error(),
                     v.is_protected()});
    }
    return out;
  }

  CaptureStats last_capture() const override { return stats_; }
  int rank() const override { return opts_.rank; }
  int node_id() const override { return node_id_; }

 private:
  void Beat(BeatPhase phase, int64_t step, const std::string& detail = "") {
    if (heartbeat_) heartbeat_->Send(phase, step, detail);
  }

  // Sends a request and returns the reply, or the agent's error as a Status.
  Result<proto::Reply> Call(const proto::Request& req) {
    std::lock_guard<std::mutex> lock(call_mu_);
    if (fd_ < 0) return Unavailable("rank " + std::to_string(opts_.rank) + ": not connected to the agent");
    Status st = SendFrame(fd_, req);
    proto::Reply reply;
    if (st.ok()) st = RecvFrame(fd_, &reply);
    if (!st.ok()) {
      return Unavailable("rank " + std::to_string(opts_.rank) + ": lost the agent at " + socket_path_ + ": " +
                         st.message());
    }
    if (reply.has_error()) {
      return Status(static_cast<StatusCode>(reply.error().code()), reply.error().message(), reply.error().retryable());
    }
    return reply;
  }

  // Calls fn(offset, bytes) for the pieces of tensor t split at the slot's pin-chunk boundaries:
  // a CUDA copy must lie within one cudaHostRegister'ed range.
  template <typename Fn>
  static Status ForEachPinnedPiece(const TensorEntry& t, Fn fn) {
    size_t off = 0;
    while (off < t.bytes) {
      const size_t abs = t.slot_offset + off;
      const size_t n = std::min(t.bytes - off, kPinChunk - abs % kPinChunk);
      MEMENTO_RETURN_IF_ERROR(fn(off, n));
      off += n;
    }
    return Status::Ok();
  }

  // Drops `held` (CUDA and NCCL resources) in the background, after the previous one.
  void Release(std::shared_ptr<void> held) {
    if (held == nullptr) return;
    auto previous = std::make_shared<std::future<void>>(std::move(releasing_));
    releasing_ = std::async(std::launch::async, [previous, held = std::move(held)]() mutable {
      if (previous->valid()) previous->wait();
      held.reset();
    });
  }

  static bool ReshardPrepWanted() { return EnvInt("MEMENTO_RESHARD_PREP", 1) != 0; }

  // The background pinning pauses while the set-up runs (both wait on the driver).
  void StartReshardPrep(int device) {
    auto hold = std::make_shared<PinGate::Hold>(&pin_gate_);
    prep_hold_ = hold;
    reshard_prep_ = StartMemoryReshardPrep(device, [hold]() { hold->Release(); });
  }

  // The CUDA copiers exist once the background pinning finished.
  Status AwaitPinning() {
    if (pinning_.valid()) pin_status_ = pinning_.get();
    return pin_status_;
  }

  void Drain() {
    std::promise<void> p;
    auto f = p.get_future();
    worker_->Submit([&p] { p.set_value(); });
    f.wait();
  }

  // Runs on the worker thread: slot, copies, then the captured report.
  // The training thread is released as soon as the bytes have landed; the captured report follows
  // on this thread, before any later capture (the worker runs tasks in order). A failed report
  // is returned by the next Snapshot().
  void Capture(int64_t step, std::shared_ptr<std::promise<Status>> done, Clock::time_point t0) {
    Status st = CopyIntoSlot(step);
    copy_seconds_.store(Seconds(t0, Clock::now()));
    done->set_value(st);
    if (!st.ok()) return;
    KillPoint("client.before_captured", opts_.rank, step);
    proto::Request req;
    req.mutable_captured()->set_step(step);
    LogCapture(step, "copied");
    auto r = Call(req);
    if (!r.ok()) {
      std::lock_guard<std::mutex> lock(report_mu_);
      report_error_ = r.status().WithContext("reporting step " + std::to_string(step) + " captured");
      return;
    }
    LogCapture(step, "acked");
  }

  // MEMENTO_CAPTURE_LOG (tests, debugging): a line when a capture's bytes have landed, before
  // the report ("copied"), and one once the agent acknowledged it ("acked"); each appended with
  // a single write(2) so that lines of concurrent ranks never interleave.
  void LogCapture(int64_t step, const char* event) {
    const std::string& path = Env().capture_log;
    if (path.empty()) return;
    const std::string line = "attempt=" + std::to_string(Env().attempt) + " rank=" + std::to_string(opts_.rank) +
                             " step=" + std::to_string(step) + " " + event + "\n";
    AppendLogLine(path, line, "MEMENTO_CAPTURE_LOG");
  }

  Status TakeReportError() {
    std::lock_guard<std::mutex> lock(report_mu_);
    Status st = report_error_;
    report_error_ = Status::Ok();
    return st;
  }

  Status CopyIntoSlot(int64_t step) {
    const auto t_begin = Clock::now();
    proto::Request req;
    req.mutable_begin_capture()->set_step(step);
    req.mutable_begin_capture()->set_timeout_ms(opts_.slot_timeout_ms);
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply reply, Call(req));
    const auto t_slot = Clock::now();
    const int slot = reply.begin_capture().slot_index();
    if (slot < 0 || slot >= static_cast<int>(slots_.size())) {
      return Internal("agent named slot " + std::to_string(slot) + " for step " + std::to_string(step));
    }
    uint8_t* base = slots_[slot]->data();
    uint64_t bytes = 0;
    TaskGroup group;
    for (const TensorEntry& t : tensors_) {
      uint8_t* dst = base + t.slot_offset;
      bytes += t.bytes;
      if (t.where == MemoryKind::kCuda) {
        CudaCopier* c = copiers_.at(t.device).get();
        MEMENTO_RETURN_IF_ERROR(ForEachPinnedPiece(t, [&](size_t off, size_t n) {
          return c->EnqueueD2H(dst + off, static_cast<const uint8_t*>(t.data) + off, n);
        }));
        continue;
      }
      const uint8_t* src = static_cast<const uint8_t*>(t.data);
      for (size_t off = 0; off < t.bytes; off += opts_.copy_chunk_bytes) {
        const size_t n = std::min(opts_.copy_chunk_bytes, t.bytes - off);
        group.Add();
        copy_pool_->Submit([&group, dst, src, off, n] {
          std::memcpy(dst + off, src + off, n);
          group.Done();
        });
      }
    }
    for (BlobEntry& b : blobs_) {
      uint64_t len = b.staged.size();
      std::memcpy(base + b.slot_offset, &len, 8);
      std::memcpy(base + b.slot_offset + 8, b.staged.data(), len);
      // Zero the rest so the CRC does not depend on stale bytes.
      std::memset(base + b.slot_offset + 8 + len, 0, b.capacity - len);
      bytes += 8 + len;
    }
    KillPoint("client.during_copy", opts_.rank, step);
    group.Wait();
    const auto t_host = Clock::now();
    Status cuda_status;
    for (auto& [dev, c] : copiers_) {
      Status s = c->Synchronize();
      if (cuda_status.ok() && !s.ok()) cuda_status = s;
    }
    copy_bytes_.store(bytes);
    MEMENTO_LOG(kDebug) << "rank " << opts_.rank << " step " << step << ": slot after "
                        << Seconds(t_begin, t_slot) * 1e3 << " ms, host copies and enqueue "
                        << Seconds(t_slot, t_host) * 1e3 << " ms, device copies done after "
                        << Seconds(t_host, Clock::now()) * 1e3 << " ms more (" << bytes << " bytes)";
    return cuda_status;
  }

 public:
  std::string socket_path_;
  std::unique_ptr<HeartbeatSender> heartbeat_;  // null without memento-run
  uint64_t incarnation_ = 0;

 private:
  ClientOptions opts_;
  int fd_ = -1;
  int node_id_ = -1;
  MemoryReshardStats last_reshard_;            // the last in-memory reshard, for logs and benchmarks
  int64_t last_step_ = -1;                     // the newest Snapshot() or Restore() step
  std::mutex call_mu_;
  std::mutex report_mu_;
  Status report_error_;  // GUARDED_BY(report_mu_)
  bool finished_ = false;
  std::vector<TensorEntry> tensors_;
  std::vector<BlobEntry> blobs_;
  std::vector<std::unique_ptr<SharedMemory>> slots_;
  std::map<int, std::unique_ptr<CudaCopier>> copiers_;  // written by pinning_ until it is done
  std::future<Status> pinning_;
  PinGate pin_gate_;  // pauses pinning_ between slices
  std::shared_ptr<MemoryReshardPrep> reshard_prep_;  // set-up of a resharded restore, started ahead
  bool reshard_likely_ = false;  // the agent's hint at the handshake (HelloReply.reshard_likely)
  std::shared_ptr<PinGate::Hold> prep_hold_;  // the pinning waits for the set-up
  std::future<void> releasing_;                      // CUDA and NCCL resources freed in the background
  Status pin_status_;
  std::unique_ptr<ThreadPool> copy_pool_;
  std::unique_ptr<ThreadPool> worker_;
  std::future<Status> inflight_;
  int64_t inflight_step_ = -1;
  Clock::time_point snapshot_started_;
  std::atomic<double> copy_seconds_{0};
  std::atomic<uint64_t> copy_bytes_{0};
  CaptureStats stats_;
};

Result<int> ConnectSocket(const std::string& path, int timeout_ms) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return InvalidArgument("agent socket path '" + path + "' is too long");
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return PosixError("socket()");
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
    int err = errno;
    ::close(fd);
    if ((err != ENOENT && err != ECONNREFUSED) || Clock::now() >= deadline) {
      return Unavailable("cannot connect to the memento agent at " + path + ": " + std::strerror(err) +
                         (err == ENOENT || err == ECONNREFUSED ? " (is memento-agent running for this node?)" : ""));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace

Result<std::unique_ptr<Client>> Client::Connect(ClientOptions o) {
  const EnvSettings& env = Env();
  if (o.rank < 0) o.rank = EnvInt("OMPI_COMM_WORLD_RANK", EnvInt("PMIX_RANK", EnvInt("SLURM_PROCID", -1)));
  if (o.world_size < 0) o.world_size = EnvInt("OMPI_COMM_WORLD_SIZE", EnvInt("SLURM_NTASKS", -1));
  if (o.rank < 0 || o.world_size <= 0) {
    return InvalidArgument("the client needs its rank and world size (ClientOptions or the launcher's environment)");
  }
  if (o.node_id < 0) {
    o.node_id = env.node_id >= 0 ? env.node_id : env.ranks_per_node > 0 ? o.rank / env.ranks_per_node : 0;
    if (env.node_id < 0 && env.ranks_per_node > 0 && !env.node_ids.empty()) {
      const size_t position = static_cast<size_t>(o.rank / env.ranks_per_node);
      if (position >= env.node_ids.size()) {
        return InvalidArgument("rank " + std::to_string(o.rank) + " is on node position " + std::to_string(position) +
                               " (MEMENTO_RANKS_PER_NODE=" + std::to_string(env.ranks_per_node) +
                               ") but MEMENTO_NODE_IDS lists " + std::to_string(env.node_ids.size()) + " nodes");
      }
      o.node_id = env.node_ids[position];
    }
  }
  if (o.local_rank < 0) {
    o.local_rank = env.ranks_per_node > 0 ? o.rank % env.ranks_per_node
                                          : EnvInt("OMPI_COMM_WORLD_LOCAL_RANK", EnvInt("SLURM_LOCALID", 0));
  }
  if (o.job_id.empty()) o.job_id = env.job_id;
  if (o.job_token.empty()) o.job_token = env.job_token;
  if (o.agent_socket.empty()) o.agent_socket = env.agent_socket;
  if (o.agent_socket.empty()) {
    if (o.job_id.empty()) return InvalidArgument("the client needs the agent socket or the job id (MEMENTO_AGENT_SOCKET / MEMENTO_JOB_ID)");
    o.agent_socket = "/tmp/memento-" + o.job_id + "-node%n.sock";
  }
  if (o.copy_threads <= 0) o.copy_threads = env.copy_threads > 0 ? env.copy_threads : 4;
  if (o.copy_chunk_bytes == 0) o.copy_chunk_bytes = size_t{8} << 20;
  const std::string path = ExpandNodePattern(o.agent_socket, o.node_id);
  MEMENTO_ASSIGN_OR_RETURN(int fd, ConnectSocket(path, o.connect_timeout_ms));
  if (o.heartbeat.empty()) o.heartbeat = env.heartbeat;
  std::unique_ptr<HeartbeatSender> heartbeat;
  if (!o.heartbeat.empty()) {
    Result<std::unique_ptr<HeartbeatSender>> hb = HeartbeatSender::Create(o.heartbeat, o.job_id, o.rank);
    if (!hb.ok()) return hb.status().WithContext("MEMENTO_HEARTBEAT");
    heartbeat = std::move(hb).value();
  }
  auto client = std::make_unique<ClientImpl>(o, fd);
  client->socket_path_ = path;
  client->heartbeat_ = std::move(heartbeat);
  MEMENTO_RETURN_IF_ERROR(client->Handshake());
  return std::unique_ptr<Client>(std::move(client));
}

}  // namespace memento
