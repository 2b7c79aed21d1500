// In-memory resharding over NCCL: when the job restarts in another layout (TP / DP / ZeRO degrees)
// and the agents still hold a version of the earlier one, the ranks fill their tensors from the
// agents' slots instead of loading a checkpoint. Each old rank's slot is read by one new rank on its
// node (its server), packed into pinned staging, copied to the device and sent with ncclSend to the
// ranks that need its boxes; receivers scatter into their tensors. Collective over the job's ranks;
// called by Client::Restore() when the agent's reply says so. Without CUDA in the build it answers
// NotSupported.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/thread_pool.h"
#include "proto/memento.pb.h"

namespace memento {

struct MemoryReshardTensor {
  void* data = nullptr;
  uint64_t bytes = 0;
  bool cuda = false;
  int device = 0;
};

struct MemoryReshardBlob {
  std::string name;
  void* data = nullptr;
  size_t capacity = 0;
  size_t* size = nullptr;
};

// The set-up a resharded restore can do ahead of it, in the background: NCCL's per-process
// initialisation (a communicator of one rank loads NCCL's kernels and reads the topology) and the
// pinned staging and device buffers. The client starts it while the rank waits for the job's other
// ranks, when its agent says it holds an earlier layout; it is dropped unused when the agents
// restore from storage. Opaque; null without NCCL in the build.
struct MemoryReshardPrep;
// `done` (optional) is called on the prep's thread when it is over.
std::shared_ptr<MemoryReshardPrep> StartMemoryReshardPrep(int device, std::function<void()> done = nullptr);

struct MemoryReshardIo {
  int rank = 0;
  int world_size = 0;
  proto::RankRecord registration;           // this rank's tensors (same order as `tensors`)
  std::vector<MemoryReshardTensor> tensors;
  std::vector<MemoryReshardBlob> blobs;
  // Exchanges the NCCL unique id through the agents: rank 0 passes its id, every rank gets it back.
  std::function<Result<std::string>(const std::string&)> exchange_id;
  ThreadPool* pool = nullptr;               // packing threads
  int pool_threads = 1;                     // how many
  size_t chunk_bytes = 0;                   // most per peer and round; 0 = chosen from the world size
  // Most channels (CTAs) of the communicator, 0 = NCCL's choice. NCCL opens every channel to every
  // peer at the first send: 4 instead of its default cut that from 1.14 s to 0.16 s among 4 GPUs,
  // and the transfer, paced by the host staging, did not slow (docs/PERFORMANCE.md).
  int nccl_channels = 0;
  std::shared_ptr<MemoryReshardPrep> prep;  // from StartMemoryReshardPrep(), or null
  // When set, receives the communicator and the buffers, for the caller to release after
  // returning (in the background); else they are released before RunMemoryReshard returns.
  std::shared_ptr<void>* leftovers = nullptr;
};

struct MemoryReshardStats {
  double seconds = 0;
  uint64_t bytes_sent = 0;       // to other ranks over NCCL
  uint64_t bytes_received = 0;
  uint64_t bytes_local = 0;      // from slots this rank serves to itself
  int rounds = 0;
  double setup_seconds = 0;     // communicator, layouts, plan, buffers
  double id_seconds = 0;        // of which the NCCL id's exchange through the agents
  double nccl_init_seconds = 0; //   ncclCommInitRank
  double warm_wait_seconds = 0; //     of which waiting for the warm-up (MemoryReshardPrep)
  double layouts_seconds = 0;   //   the slots mapped and the layouts allgathered
  double buffers_seconds = 0;   //   the plan and the staging and device buffers
  double prep_wait_seconds = 0; //     of which waiting for the buffers allocated ahead
  double prep_seconds = 0;      // the set-up done ahead (MemoryReshardPrep), in the background
  bool warm_nccl = false;       // NCCL was initialised ahead (a communicator of one rank)
  double warm_seconds = 0;      // how long that took
  double pack_seconds = 0;      // threads copying from the slots into pinned staging
  double gpu_wait_seconds = 0;  // waiting for copies and NCCL
  double enqueue_seconds = 0;   // issuing copies and NCCL calls (ncclGroupEnd connects peers on first use)
  double first_round_seconds = 0;  // round 0 on the host, from packing to its last call
};

Status RunMemoryReshard(const proto::MemoryReshard& info, const MemoryReshardIo& io, MemoryReshardStats* stats);

}  // namespace memento
