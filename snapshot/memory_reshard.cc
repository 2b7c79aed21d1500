// In-memory resharding over NCCL (memory_reshard.h). Steps, on every rank:
//  1. the NCCL unique id (rank 0's) through the agents; a communicator on the rank's device;
//  2. metadata: each rank maps the slots of the old ranks it serves and allgathers its new
//     registration, the served old ranks' layouts and their blobs (ReshardPeer);
//  3. every rank computes the same plan (memory_reshard_plan.h);
//  4. rounds: servers pack up to `chunk` bytes per peer from the slots into pinned staging (the
//     packing threads), copy them to the device, and ncclSend them; receivers ncclRecv and scatter
//     into their tensors; bytes a rank serves to itself go from staging straight to its tensors.
#include "snapshot/memory_reshard.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <cstring>
#include <map>
#include <memory>

#include "core/log.h"
#include "core/shared_memory.h"
#include "snapshot/memory_reshard_plan.h"

namespace memento {
namespace {

Status Cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  return Internal(std::string("in-memory resharding: ") + what + ": " + cudaGetErrorString(e));
}

Status Nccl(ncclResult_t r, const char* what) {
  if (r == ncclSuccess) return Status::Ok();
  return Internal(std::string("in-memory resharding: ") + what + ": " + ncclGetErrorString(r));
}

// Device and pinned buffers freed on every exit path.
struct Buffers {
  std::vector<void*> device, pinned;
  ~Buffers() {
    for (void* p : device) cudaFree(p);
    for (void* p : pinned) cudaFreeHost(p);
  }
  Result<uint8_t*> Device(size_t n) {
    void* p = nullptr;
    MEMENTO_RETURN_IF_ERROR(Cuda(cudaMalloc(&p, std::max<size_t>(n, 1)), "cudaMalloc of a transfer buffer"));
    device.push_back(p);
    return static_cast<uint8_t*>(p);
  }
  Result<uint8_t*> Pinned(size_t n) {
    void* p = nullptr;
    MEMENTO_RETURN_IF_ERROR(Cuda(cudaMallocHost(&p, std::max<size_t>(n, 1)), "cudaMallocHost of a staging buffer"));
    pinned.push_back(p);
    return static_cast<uint8_t*>(p);
  }
};

struct Comm {
  ncclComm_t comm = nullptr;
  ~Comm() {
    if (comm != nullptr) ncclCommDestroy(comm);
  }
};

struct Stream {
  cudaStream_t s = nullptr;
  ~Stream() {
    if (s != nullptr) cudaStreamDestroy(s);
  }
};

// One buffer set's bytes (the transfer is double buffered: two sets), whatever the world size:
// the chunk per peer and round is a set divided by the most pairs any rank stages or receives.
constexpr size_t kSetBytes = size_t{128} << 20;
constexpr size_t kMinChunk = size_t{1} << 20;

// Pinned staging and device buffers for both sets: per set, `set_bytes` of staging (the pairs a
// rank serves, itself included) and twice that on the device (the staged pairs, then receives).
struct Arena {
  Buffers buffers;
  size_t set_bytes = 0;
  uint8_t* pinned = nullptr;
  uint8_t* device = nullptr;

  Status Allocate(size_t set) {
    MEMENTO_ASSIGN_OR_RETURN(pinned, buffers.Pinned(2 * set));
    MEMENTO_ASSIGN_OR_RETURN(device, buffers.Device(4 * set));
    set_bytes = set;
    return Status::Ok();
  }
  uint8_t* Staging(int set) const { return pinned + static_cast<size_t>(set) * set_bytes; }
  uint8_t* Staged(int set) const { return device + static_cast<size_t>(set) * 2 * set_bytes; }
  uint8_t* Received(int set) const { return Staged(set) + set_bytes; }
};

}  // namespace

struct MemoryReshardPrep {
  int device = 0;
  std::future<Status> ready;   // the arena (and the warm-up) done
  std::shared_future<void> warmed;  // the warm-up done (tried), before the arena
  ncclComm_t warm = nullptr;   // a communicator of this rank alone
  double warm_seconds = 0;
  Arena arena;
  double seconds = 0;

  ~MemoryReshardPrep() {
    if (ready.valid()) ready.wait();
    if (warm != nullptr) ncclCommDestroy(warm);
  }
};

namespace {

std::shared_ptr<MemoryReshardPrep> StartPrep(int device, bool warm_nccl, std::function<void()> done) {
  auto prep = std::make_shared<MemoryReshardPrep>();
  prep->device = device;
  MemoryReshardPrep* p = prep.get();
  auto warmed = std::make_shared<std::promise<void>>();
  prep->warmed = warmed->get_future().share();
  prep->ready = std::async(std::launch::async, [p, warm_nccl, warmed, done = std::move(done)]() -> Status {
    struct Done {
      const std::function<void()>& f;
      ~Done() {
        if (f) f();
      }
    } call_done{done};
    const auto t0 = std::chrono::steady_clock::now();
    struct Warmed {
      std::promise<void>& p;
      bool set = false;
      void Set() {
        if (!set) p.set_value();
        set = true;
      }
      ~Warmed() { Set(); }
    } warmed_once{*warmed};
    MEMENTO_RETURN_IF_ERROR(Cuda(cudaSetDevice(p->device), "cudaSetDevice"));
    if (warm_nccl) {
      // A communicator's creation loads NCCL's kernels into the device's context, once per
      // process (0.4-0.5 s of the 0.5-0.6 s on an H200): a communicator of this rank alone does
      // that now, so the job's communicator later only connects the ranks (0.03-0.06 s). A
      // failure here costs nothing but the head start.
      ncclUniqueId id;
      if (ncclGetUniqueId(&id) != ncclSuccess || ncclCommInitRank(&p->warm, 1, id, 0) != ncclSuccess) p->warm = nullptr;
      p->warm_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    warmed_once.Set();
    Status st = p->arena.Allocate(kSetBytes);
    p->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return st;
  });
  return prep;
}

// A pair with the stream position where each of its runs starts, for ranges in O(log runs).
struct IndexedPair {
  const ReshardPair* pair = nullptr;
  std::vector<uint64_t> start;
  explicit IndexedPair(const ReshardPair* p) : pair(p) {
    uint64_t pos = 0;
    for (const ReshardRun& r : p->runs) {
      start.push_back(pos);
      pos += r.bytes;
    }
  }
  // Calls fn(run, offset in the run, stream position, length) for the stream's [begin, end).
  template <typename Fn>
  void ForRange(uint64_t begin, uint64_t end, Fn fn) const {
    size_t i = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), begin) - start.begin());
    i = i == 0 ? 0 : i - 1;
    for (; i < pair->runs.size() && start[i] < end; ++i) {
      const ReshardRun& r = pair->runs[i];
      const uint64_t a = std::max(start[i], begin), b = std::min(start[i] + r.bytes, end);
      if (a < b) fn(r, a - start[i], a, b - a);
    }
  }
};

// A strided copy into a tensor: `height` rows of `width` bytes, contiguous in the stream from
// `src`, `pitch` bytes apart in the tensor from `dst` (one cudaMemcpy2DAsync instead of a copy
// per row: a rows-to-columns reshard has one run per row).
struct ScatterOp {
  int32_t tensor = 0;
  uint64_t dst = 0, src = 0, width = 0, height = 1, pitch = 0;
};

std::vector<ScatterOp> ScatterOps(const IndexedPair& p, uint64_t begin, uint64_t end) {
  std::vector<ScatterOp> ops;
  p.ForRange(begin, end, [&](const ReshardRun& r, uint64_t in_run, uint64_t pos, uint64_t n) {
    const uint64_t dst = r.dst_offset + in_run, src = pos - begin;
    if (!ops.empty()) {
      ScatterOp& o = ops.back();
      if (o.tensor == r.tensor && o.width == n && src == o.src + o.width * o.height) {
        if (o.height == 1 && dst >= o.dst + n && dst - o.dst <= (uint64_t{1} << 30)) {
          o.pitch = dst - o.dst;
          o.height = 2;
          return;
        }
        if (o.height > 1 && dst == o.dst + o.pitch * o.height) {
          ++o.height;
          return;
        }
      }
    }
    ops.push_back({r.tensor, dst, src, n, 1, n});
  });
  return ops;
}

// Allgathers each rank's bytes (any length) over `comm`.
Result<std::vector<std::string>> AllgatherBytes(ncclComm_t comm, cudaStream_t stream, int world, const std::string& mine) {
  Buffers buf;
  MEMENTO_ASSIGN_OR_RETURN(uint8_t* sizes_d, buf.Device(sizeof(uint64_t) * world));
  const uint64_t my_size = mine.size();
  MEMENTO_RETURN_IF_ERROR(Cuda(cudaMemcpy(sizes_d + sizeof(uint64_t) * 0, &my_size, 8, cudaMemcpyHostToDevice), "copy"));
  MEMENTO_ASSIGN_OR_RETURN(uint8_t* sizes_all, buf.Device(sizeof(uint64_t) * world));
  MEMENTO_RETURN_IF_ERROR(Nccl(ncclAllGather(sizes_d, sizes_all, 8, ncclChar, comm, stream), "allgather of sizes"));
  MEMENTO_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "synchronize"));
  std::vector<uint64_t> sizes(world);
  MEMENTO_RETURN_IF_ERROR(Cuda(cudaMemcpy(sizes.data(), sizes_all, 8 * world, cudaMemcpyDeviceToHost), "copy"));
  const uint64_t most = std::max<uint64_t>(*std::max_element(sizes.begin(), sizes.end()), 1);
  MEMENTO_ASSIGN_OR_RETURN(uint8_t* in, buf.Device(most));
  MEMENTO_ASSIGN_OR_RETURN(uint8_t* out, buf.Device(most * world));
  if (!mine.empty()) MEMENTO_RETURN_IF_ERROR(Cuda(cudaMemcpy(in, mine.data(), mine.size(), cudaMemcpyHostToDevice), "copy"));
  MEMENTO_RETURN_IF_ERROR(Nccl(ncclAllGather(in, out, most, ncclChar, comm, stream), "allgather of the layouts"));
  MEMENTO_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "synchronize"));
  std::vector<uint8_t> host(most * world);
  MEMENTO_RETURN_IF_ERROR(Cuda(cudaMemcpy(host.data(), out, host.size(), cudaMemcpyDeviceToHost), "copy"));
  std::vector<std::string> all(world);
  for (int r = 0; r < world; ++r) all[r].assign(reinterpret_cast<const char*>(host.data() + most * r), sizes[r]);
  return all;
}

}  // namespace

std::shared_ptr<MemoryReshardPrep> StartMemoryReshardPrep(int device, std::function<void()> done) {
  return StartPrep(device, /*warm_nccl=*/true, std::move(done));
}

namespace {

// What a reshard holds until it is released (by the caller's deferred release, or on return).
struct Resources {
  int device = 0;
  std::shared_ptr<MemoryReshardPrep> prep;
  Arena own;  // when the prep's did not do
  std::map<int32_t, std::unique_ptr<SharedMemory>> slots;  // old rank -> its slot of the version
  Stream stream;
  cudaEvent_t done[2] = {nullptr, nullptr};
  Comm comm;  // destroyed first

  ~Resources() {
    cudaSetDevice(device);
    for (cudaEvent_t e : done) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  }
};

}  // namespace

Status RunMemoryReshard(const proto::MemoryReshard& info, const MemoryReshardIo& io, MemoryReshardStats* stats) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string who = "rank " + std::to_string(io.rank);
  int device = -1;
  for (const MemoryReshardTensor& t : io.tensors) {
    if (t.cuda) {
      device = t.device;
      break;
    }
  }
  if (device < 0) return FailedPrecondition(who + ": in-memory resharding needs a CUDA tensor on every rank");
  int previous_device = 0;
  MEMENTO_RETURN_IF_ERROR(Cuda(cudaGetDevice(&previous_device), "cudaGetDevice"));
  struct RestoreDevice {
    int d;
    ~RestoreDevice() { cudaSetDevice(d); }
  } restore_device{previous_device};
  MEMENTO_RETURN_IF_ERROR(Cuda(cudaSetDevice(device), "cudaSetDevice"));
  auto res = std::make_shared<Resources>();  // released before restore_device: declared after it
  res->device = device;
  // The buffers: the prep's (started ahead by the caller), or allocated now in the background
  // while the communicator is created.
  res->prep = io.prep != nullptr && io.prep->device == device ? io.prep : StartPrep(device, /*warm_nccl=*/false, nullptr);

  // 1. The communicator.
  std::string id;
  if (io.rank == 0) {
    ncclUniqueId uid;
    MEMENTO_RETURN_IF_ERROR(Nccl(ncclGetUniqueId(&uid), "ncclGetUniqueId"));
    id.assign(reinterpret_cast<const char*>(&uid), sizeof uid);
  }
  auto since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  MEMENTO_ASSIGN_OR_RETURN(std::string shared, io.exchange_id(id));
  stats->id_seconds = since(t0);
  if (shared.size() != sizeof(ncclUniqueId)) {
    return Internal(who + ": an NCCL id of " + std::to_string(shared.size()) + " bytes, expected " +
                    std::to_string(sizeof(ncclUniqueId)));
  }
  ncclUniqueId uid;
  std::memcpy(&uid, shared.data(), sizeof uid);
  const auto t_init = std::chrono::steady_clock::now();
  // After the warm-up, if one runs: NCCL's kernels load once, not in both at the same time.
  if (res->prep->warmed.valid()) res->prep->warmed.wait();
  stats->warm_wait_seconds = since(t_init);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  if (io.nccl_channels > 0) config.maxCTAs = io.nccl_channels;
  MEMENTO_RETURN_IF_ERROR(
      Nccl(ncclCommInitRankConfig(&res->comm.comm, io.world_size, uid, io.rank, &config), "ncclCommInitRankConfig"));
  stats->nccl_init_seconds = since(t_init);
  ncclComm_t comm = res->comm.comm;
  MEMENTO_RETURN_IF_ERROR(Cuda(cudaStreamCreateWithFlags(&res->stream.s, cudaStreamNonBlocking), "cudaStreamCreate"));
  cudaStream_t stream = res->stream.s;

  // 2. The old ranks this rank serves, their slots and blobs; then everyone's.
  const auto t_layouts = std::chrono::steady_clock::now();
  std::vector<int32_t> old_here;
  for (const proto::RankRecord& r : info.old_ranks()) old_here.push_back(r.rank());
  std::vector<int32_t> new_here(info.new_ranks().begin(), info.new_ranks().end());
  const std::vector<int32_t> servers = ServersOf(old_here, new_here);
  proto::ReshardPeer mine;
  *mine.mutable_target() = io.registration;
  mine.mutable_target()->clear_slot_names();
  std::map<int32_t, std::unique_ptr<SharedMemory>>& slots = res->slots;
  for (size_t i = 0; i < servers.size(); ++i) {
    if (servers[i] != io.rank) continue;
    const proto::RankRecord& old = info.old_ranks(static_cast<int>(i));
    std::string error;
    if (info.slot_index() < 0 || info.slot_index() >= old.slot_names_size()) {
      error = "old rank " + std::to_string(old.rank()) + " has no slot " + std::to_string(info.slot_index());
    } else {
      // Not pre-faulted: the packing threads fault the pages in, in parallel.
      auto seg = SharedMemory::Open(old.slot_names(info.slot_index()), old.slot_bytes(), /*writable=*/false,
                                    /*populate=*/false);
      if (!seg.ok()) {
        error = "old rank " + std::to_string(old.rank()) + ": " + seg.status().message();
      } else {
        for (const proto::BlobRecord& b : old.blobs()) {
          uint64_t len = 0;
          std::memcpy(&len, (*seg)->data() + b.slot_offset(), 8);
          if (len > b.capacity()) {
            error = "old rank " + std::to_string(old.rank()) + " blob '" + b.name() + "' claims " +
                    std::to_string(len) + " bytes, more than its capacity " + std::to_string(b.capacity());
            break;
          }
          proto::ReshardBlob* rb = mine.add_blobs();
          rb->set_old_rank(old.rank());
          rb->set_name(b.name());
          rb->set_data(reinterpret_cast<const char*>((*seg)->data() + b.slot_offset() + 8), len);
        }
        slots[old.rank()] = std::move(seg).value();
      }
    }
    if (!error.empty()) mine.set_error(mine.error() + (mine.error().empty() ? "" : "; ") + error);
    *mine.add_served() = old;
  }
  MEMENTO_ASSIGN_OR_RETURN(std::vector<std::string> peers_raw,
                           AllgatherBytes(comm, stream, io.world_size, mine.SerializeAsString()));
  std::vector<proto::RankRecord> targets(io.world_size);
  std::vector<ReshardSource> sources;
  std::vector<proto::ReshardPeer> peers(io.world_size);
  for (int r = 0; r < io.world_size; ++r) {
    if (!peers[r].ParseFromString(peers_raw[r])) return DataLoss(who + ": rank " + std::to_string(r) + " sent a malformed layout");
    if (!peers[r].error().empty()) {
      return FailedPrecondition("in-memory resharding of step " + std::to_string(info.step()) + " failed on rank " +
                                std::to_string(r) + ": " + peers[r].error());
    }
    targets[r] = peers[r].target();
    for (const proto::RankRecord& old : peers[r].served()) sources.push_back({r, old});
  }
  if (static_cast<int>(sources.size()) != info.old_world_size()) {
    return FailedPrecondition(who + ": the ranks serve " + std::to_string(sources.size()) + " of the earlier layout's " +
                              std::to_string(info.old_world_size()) + " ranks");
  }
  // Blobs: rank r gets old rank r's blob of the same name, as loading a checkpoint does.
  std::vector<const proto::ReshardBlob*> blob_sources;  // by io.blobs index
  for (const MemoryReshardBlob& b : io.blobs) {
    const proto::ReshardBlob* blob_source = nullptr;
    for (const proto::ReshardPeer& p : peers) {
      for (const proto::ReshardBlob& rb : p.blobs()) {
        if (rb.old_rank() == io.rank && rb.name() == b.name) blob_source = &rb;
      }
    }
    if (blob_source == nullptr) {
      return NotFound(who + " blob '" + b.name + "' is not in step " + std::to_string(info.step()) +
                      " of the earlier layout (world size " + std::to_string(info.old_world_size()) + ")");
    }
    if (blob_source->data().size() > b.capacity) {
      return FailedPrecondition(who + " blob '" + b.name + "': the earlier layout holds " +
                                std::to_string(blob_source->data().size()) + " bytes, the capacity is " +
                                std::to_string(b.capacity));
    }
    blob_sources.push_back(blob_source);
  }

  stats->layouts_seconds = since(t_layouts);
  const auto t_buffers = std::chrono::steady_clock::now();

  // 3. The plan.
  MEMENTO_ASSIGN_OR_RETURN(std::vector<ReshardPair> pairs, PlanMemoryReshard(targets, sources));

  // 4. The transfer. The chunk per pair and round: a buffer set over the most pairs any rank
  // stages (serves, itself included) or receives; every rank computes the same.
  std::vector<int> staged_by(io.world_size, 0), received_by(io.world_size, 0);
  for (const ReshardPair& p : pairs) {
    ++staged_by[p.server];
    if (p.server != p.target) ++received_by[p.target];
  }
  const size_t most_pairs = static_cast<size_t>(std::max({1, *std::max_element(staged_by.begin(), staged_by.end()),
                                                          *std::max_element(received_by.begin(), received_by.end())}));
  const size_t set_bytes = std::max(kSetBytes, most_pairs * kMinChunk);
  size_t chunk = set_bytes / most_pairs / 4096 * 4096;
  if (io.chunk_bytes != 0) chunk = std::min(chunk, io.chunk_bytes);
  std::vector<IndexedPair> send_pairs, recv_pairs, self_pair;
  uint64_t most = 0;
  for (const ReshardPair& p : pairs) {
    most = std::max(most, p.bytes);
    if (p.server == io.rank && p.target == io.rank) {
      self_pair.emplace_back(&p);
    } else if (p.server == io.rank) {
      send_pairs.emplace_back(&p);
    } else if (p.target == io.rank) {
      recv_pairs.emplace_back(&p);
    }
  }
  std::vector<const ReshardPair*> sends, recvs;
  for (const IndexedPair& p : send_pairs) sends.push_back(p.pair);
  for (const IndexedPair& p : recv_pairs) recvs.push_back(p.pair);
  const ReshardPair* self = self_pair.empty() ? nullptr : self_pair[0].pair;
  const int rounds = static_cast<int>((most + chunk - 1) / chunk);
  const auto t_wait = std::chrono::steady_clock::now();
  const Status prepared = res->prep->ready.valid() ? res->prep->ready.get() : Status::Ok();
  stats->prep_wait_seconds = since(t_wait);
  stats->prep_seconds = res->prep->seconds;
  stats->warm_nccl = res->prep->warm != nullptr;
  stats->warm_seconds = res->prep->warm_seconds;
  const Arena* arena = &res->prep->arena;
  if (!prepared.ok() || arena->set_bytes < set_bytes) {
    if (!prepared.ok()) {
      MEMENTO_LOG(kWarning) << who << ": the buffers allocated ahead failed (" << prepared.message() << "); again";
    }
    MEMENTO_RETURN_IF_ERROR(res->own.Allocate(set_bytes));
    arena = &res->own;
  }
  // Two sets of buffers: the threads pack round r + 1 while the GPU copies and sends round r.
  struct BufferSet {
    std::vector<uint8_t*> staging, send_d, recv_d;
    uint8_t* self_staging = nullptr;
    uint8_t* self_d = nullptr;
    cudaEvent_t done = nullptr;
  };
  BufferSet sets[2];
  for (int k = 0; k < 2; ++k) {
    BufferSet& set = sets[k];
    MEMENTO_RETURN_IF_ERROR(Cuda(cudaEventCreateWithFlags(&res->done[k], cudaEventDisableTiming), "cudaEventCreate"));
    set.done = res->done[k];
    for (size_t i = 0; i < sends.size(); ++i) {
      set.staging.push_back(arena->Staging(k) + i * chunk);
      set.send_d.push_back(arena->Staged(k) + i * chunk);
    }
    for (size_t i = 0; i < recvs.size(); ++i) set.recv_d.push_back(arena->Received(k) + i * chunk);
    if (self != nullptr) {
      set.self_staging = arena->Staging(k) + sends.size() * chunk;
      set.self_d = arena->Staged(k) + sends.size() * chunk;
    }
  }

  // Packing: the chunk cut into equal parts, one task each (a run may be a single 8 KiB row).
  const int parts = 2 * std::max(1, io.pool_threads);
  auto pack = [&](const IndexedPair& p, uint64_t begin, uint64_t end, uint8_t* out, TaskGroup* group) {
    const uint64_t step = std::max<uint64_t>((end - begin + parts - 1) / parts, uint64_t{1} << 20);
    for (uint64_t a = begin; a < end; a += step) {
      const uint64_t b = std::min(end, a + step);
      group->Add();
      io.pool->Submit([&, a, b, begin, out] {
        p.ForRange(a, b, [&](const ReshardRun& r, uint64_t in_run, uint64_t pos, uint64_t n) {
          std::memcpy(out + (pos - begin), slots.at(r.old_rank)->data() + r.src_offset + in_run, n);
        });
        group->Done();
      });
    }
  };
  // From a device buffer into the tensors: strided device copies (a kernel's speed, not the DMA
  // engine's per-row cost of strided host-to-device copies).
  auto scatter = [&](const IndexedPair& p, uint64_t begin, uint64_t end, const uint8_t* in) -> Status {
    for (const ScatterOp& o : ScatterOps(p, begin, end)) {
      uint8_t* dst = static_cast<uint8_t*>(io.tensors.at(static_cast<size_t>(o.tensor)).data) + o.dst;
      const cudaError_t e = o.height == 1
                                ? cudaMemcpyAsync(dst, in + o.src, o.width, cudaMemcpyDefault, stream)
                                : cudaMemcpy2DAsync(dst, o.pitch, in + o.src, o.width, o.width, o.height,
                                                    cudaMemcpyDefault, stream);
      MEMENTO_RETURN_IF_ERROR(Cuda(e, "scatter copy"));
    }
    return Status::Ok();
  };
  auto part = [&](const ReshardPair* p, uint64_t begin) { return std::min<uint64_t>(chunk, p->bytes - begin); };
  stats->buffers_seconds = since(t_buffers);
  stats->setup_seconds = since(t0);
  for (int round = 0; round < rounds; ++round) {
    BufferSet& set = sets[rounds < 2 ? 0 : round % 2];
    const uint64_t begin = static_cast<uint64_t>(round) * chunk;
    // The GPU is done with this set's buffers (round - 2) before the threads refill them.
    auto tw = std::chrono::steady_clock::now();
    MEMENTO_RETURN_IF_ERROR(Cuda(cudaEventSynchronize(set.done), "cudaEventSynchronize"));
    stats->gpu_wait_seconds += since(tw);
    auto tp = std::chrono::steady_clock::now();
    TaskGroup packed;
    for (size_t i = 0; i < sends.size(); ++i) {
      if (begin < sends[i]->bytes) pack(send_pairs[i], begin, begin + part(sends[i], begin), set.staging[i], &packed);
    }
    if (self != nullptr && begin < self->bytes) {
      pack(self_pair[0], begin, begin + part(self, begin), set.self_staging, &packed);
    }
    packed.Wait();
    stats->pack_seconds += since(tp);
    const auto te = std::chrono::steady_clock::now();
    for (size_t i = 0; i < sends.size(); ++i) {
      if (begin >= sends[i]->bytes) continue;
      MEMENTO_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(set.send_d[i], set.staging[i], part(sends[i], begin), cudaMemcpyHostToDevice,
                                      stream),
                      "staging copy"));
      stats->bytes_sent += part(sends[i], begin);
    }
    if (self != nullptr && begin < self->bytes) {
      MEMENTO_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(set.self_d, set.self_staging, part(self, begin), cudaMemcpyHostToDevice,
                                      stream),
                      "staging copy"));
    }
    MEMENTO_RETURN_IF_ERROR(Nccl(ncclGroupStart(), "ncclGroupStart"));
    for (size_t i = 0; i < sends.size(); ++i) {
      if (begin >= sends[i]->bytes) continue;
      MEMENTO_RETURN_IF_ERROR(Nccl(ncclSend(set.send_d[i], part(sends[i], begin), ncclChar, sends[i]->target, comm, stream),
                      "ncclSend"));
    }
    for (size_t i = 0; i < recvs.size(); ++i) {
      if (begin >= recvs[i]->bytes) continue;
      MEMENTO_RETURN_IF_ERROR(Nccl(ncclRecv(set.recv_d[i], part(recvs[i], begin), ncclChar, recvs[i]->server, comm, stream),
                      "ncclRecv"));
    }
    MEMENTO_RETURN_IF_ERROR(Nccl(ncclGroupEnd(), "ncclGroupEnd"));
    for (size_t i = 0; i < recvs.size(); ++i) {
      if (begin >= recvs[i]->bytes) continue;
      MEMENTO_RETURN_IF_ERROR(scatter(recv_pairs[i], begin, begin + part(recvs[i], begin), set.recv_d[i]));
      stats->bytes_received += part(recvs[i], begin);
    }
    if (self != nullptr && begin < self->bytes) {
      MEMENTO_RETURN_IF_ERROR(scatter(self_pair[0], begin, begin + part(self, begin), set.self_d));
      stats->bytes_local += part(self, begin);
    }
    MEMENTO_RETURN_IF_ERROR(Cuda(cudaEventRecord(set.done, stream), "cudaEventRecord"));
    stats->enqueue_seconds += since(te);
    if (round == 0) stats->first_round_seconds = since(tp);
  }
  auto tw = std::chrono::steady_clock::now();
  MEMENTO_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "synchronize"));
  stats->gpu_wait_seconds += since(tw);
  for (size_t i = 0; i < io.blobs.size(); ++i) {
    const std::string& data = blob_sources[i]->data();
    std::memcpy(io.blobs[i].data, data.data(), data.size());
    *io.blobs[i].size = data.size();
  }
  stats->rounds = rounds;
  stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  MEMENTO_LOG(kInfo) << who << ": resharded step " << info.step() << " from memory (world size "
                     << info.old_world_size() << " -> " << io.world_size << "): " << stats->bytes_local
                     << " bytes from this node's slots, " << stats->bytes_received << " received, " << stats->bytes_sent
                     << " sent over NCCL in " << rounds << " rounds, " << stats->seconds << " s  (set-up "
                     << stats->setup_seconds << " s: NCCL id " << stats->id_seconds << " s, ncclCommInitRank "
                     << stats->nccl_init_seconds << " s (of which waiting for the warm-up " << stats->warm_wait_seconds << " s), layouts " << stats->layouts_seconds << " s, plan and buffers "
                     << stats->buffers_seconds << " s; packing " << stats->pack_seconds << " s, issuing copies and NCCL calls "
                     << stats->enqueue_seconds << " s (round 0: " << stats->first_round_seconds << " s), waiting for the GPU "
                     << stats->gpu_wait_seconds << " s; ahead of it " << stats->prep_seconds << " s"
                     << (stats->warm_nccl ? ", NCCL initialised in " + std::to_string(stats->warm_seconds) + " s" : std::string())
                     << ")";
  if (io.leftovers != nullptr) *io.leftovers = res;
  return Status::Ok();
}

}  // namespace memento
