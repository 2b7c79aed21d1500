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
  size_t chunk_bytes = 0;                   // per peer and round; 0 = chosen from the world size
};

struct MemoryReshardStats {
  double seconds = 0;
  uint64_t bytes_sent = 0;       // to other ranks over NCCL
  uint64_t bytes_received = 0;
  uint64_t bytes_local = 0;      // from slots this rank serves to itself
  int rounds = 0;
  double setup_seconds = 0;     // communicator, layouts, plan, buffers
  double nccl_init_seconds = 0; // of which ncclCommInitRank
  double pack_seconds = 0;      // threads copying from the slots into pinned staging
  double gpu_wait_seconds = 0;  // waiting for copies and NCCL
};

Status RunMemoryReshard(const proto::MemoryReshard& info, const MemoryReshardIo& io, MemoryReshardStats* stats);

}  // namespace memento
