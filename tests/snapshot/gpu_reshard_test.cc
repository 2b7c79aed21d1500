// In-memory resharding over NCCL against real agents: a job saves in one layout, restarts in
// another while the agents keep running, and every rank's device tensors come back bit-exact from
// the agents' memory, with no storage configured. Skips, saying why, without CUDA, NCCL or enough
// devices.
#include <gtest/gtest.h>

#include <mutex>

#include "integration/harness.h"
#include "snapshot/cuda_copier.h"
#include "snapshot/shard_reference.h"

#ifdef MEMENTO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace memento::testing {
namespace {

struct TensorDef {
  std::string name;
  DType dtype;
  ShardSpec spec;
  int id;
};

// A rank's tensors on `device`, filled with the reference bytes (or zeros with fill = false).
struct DeviceState {
  int device = 0;
  std::vector<TensorDef> defs;
  std::vector<void*> ptrs;
  std::string blob = std::string(64, '\0');
  size_t blob_size = 0;

  DeviceState(int dev, std::vector<TensorDef> d, bool fill) : device(dev), defs(std::move(d)) {
#ifdef MEMENTO_WITH_CUDA
    cudaSetDevice(device);
    for (const TensorDef& t : defs) {
      std::vector<uint8_t> host = fill ? LocalBytes(t.id, t.spec, DTypeSize(t.dtype))
                                       : std::vector<uint8_t>(t.spec.local_numel * DTypeSize(t.dtype), 0);
      void* p = nullptr;
      EXPECT_EQ(cudaMalloc(&p, host.size()), cudaSuccess);
      EXPECT_EQ(cudaMemcpy(p, host.data(), host.size(), cudaMemcpyHostToDevice), cudaSuccess);
      ptrs.push_back(p);
    }
#endif
  }
  ~DeviceState() {
#ifdef MEMENTO_WITH_CUDA
    for (void* p : ptrs) cudaFree(p);
#endif
  }
  Status Register(Client* c) {
    for (size_t i = 0; i < defs.size(); ++i) {
      MEMENTO_RETURN_IF_ERROR(c->RegisterTensor(defs[i].name, ptrs[i], defs[i].dtype, defs[i].spec, MemoryKind::kCuda, device));
    }
    return c->RegisterBlob("rng", blob.data(), blob.size(), &blob_size);
  }
  // Empty when every tensor holds its reference bytes; else the first that does not.
  std::string Mismatch() const {
#ifdef MEMENTO_WITH_CUDA
    for (size_t i = 0; i < defs.size(); ++i) {
      const std::vector<uint8_t> want = LocalBytes(defs[i].id, defs[i].spec, DTypeSize(defs[i].dtype));
      std::vector<uint8_t> got(want.size());
      if (cudaMemcpy(got.data(), ptrs[i], got.size(), cudaMemcpyDeviceToHost) != cudaSuccess) return "copy failed";
      if (got != want) return defs[i].name;
    }
#endif
    return "";
  }
};

ShardSpec Must(Result<ShardSpec> r) {
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return std::move(r).value();
}

Status Available(int devices) {
  MEMENTO_RETURN_IF_ERROR(CudaCopier::Available());
#ifdef MEMENTO_WITH_CUDA
  int n = 0;
  cudaGetDeviceCount(&n);
  if (n < devices) return NotSupported("needs " + std::to_string(devices) + " GPUs, this machine has " + std::to_string(n));
#endif
  return Status::Ok();
}

// The old layout: TP rows of w, TP columns of e, a ZeRO-1 flat partition of z (world 2).
std::vector<TensorDef> OldLayout(int rank) {
  auto zero = ZeroFlatPartition({{333, 7}}, 2, rank);
  EXPECT_TRUE(zero.ok());
  return {{"w", DType::kF32, Must(SplitEvenly({64, 1000}, 0, 2, rank)), 0},
          {"e", DType::kBF16, Must(SplitEvenly({1000, 96}, 1, 2, rank)), 1},
          {"z", DType::kI64, (*zero)[0].spec, 2}};
}

// Saves steps 5 and 6 of the old layout with ranks on `nodes` (rank r on node r % nodes, device
// r % devices), and closes the clients (the job ends; the agents keep the versions).
void SaveOldLayout(const AgentCluster& cluster, int nodes, int devices) {
  RunRanks(2, [&](int r) {
    DeviceState state(r % devices, OldLayout(r), true);
    auto c = cluster.Connect(r, 2, r % nodes, r / nodes);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    ASSERT_TRUE(state.Register(c->get()).ok());
    for (int64_t step : {5, 6}) {
      const std::string cursor = "rank " + std::to_string(r) + " step " + std::to_string(step);
      std::memcpy(state.blob.data(), cursor.data(), cursor.size());
      state.blob_size = cursor.size();
      ASSERT_TRUE((*c)->Snapshot(step).ok());
      ASSERT_TRUE((*c)->WaitUntilSafeToUpdate().ok());
    }
    ASSERT_TRUE(WaitGloballyComplete(c->get(), 6));
  });
}

TEST(GpuReshardTest, TwoRanksOfOneNodeRestartAsOneRankFromMemory) {
  Status avail = Available(1);
  if (!avail.ok()) GTEST_SKIP() << "skipped: " << avail.message();
  AgentCluster cluster(UniqueJob("gpureshard1"), 1);
  cluster.Start();
  SaveOldLayout(cluster, 1, 1);
  // The new layout: one rank with whole tensors, on the same node.
  DeviceState state(0,
                    {{"w", DType::kF32, WholeTensor({64, 1000}), 0},
                     {"e", DType::kBF16, WholeTensor({1000, 96}), 1},
                     {"z", DType::kI64, WholeTensor({333, 7}), 2}},
                    false);
  auto c = cluster.Connect(0, 1, 0, 0);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_TRUE(state.Register(c->get()).ok());
  auto r = (*c)->Restore();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->step, 6);
  EXPECT_EQ(r->source, "memory (resharded from world size 2)");
  EXPECT_EQ(state.Mismatch(), "");
  EXPECT_EQ(std::string(state.blob.data(), state.blob_size), "rank 0 step 6");
  EXPECT_TRUE(cluster.LogHas("retiring versions 5, 6 of the earlier layout for in-memory resharding"));
  // The new layout's first globally complete version drops the retired one.
  ASSERT_TRUE((*c)->Snapshot(7).ok());
  ASSERT_TRUE((*c)->WaitUntilSafeToUpdate().ok());
  ASSERT_TRUE(WaitGloballyComplete(c->get(), 7));
  EXPECT_TRUE(cluster.LogHas("dropping the retired layout (world size 2, versions 5, 6): a version of the new layout"));
}

TEST(GpuReshardTest, RanksOnTwoNodesExchangeBoxesOverNccl) {
  Status avail = Available(2);
  if (!avail.ok()) GTEST_SKIP() << "skipped: " << avail.message();
  AgentCluster cluster(UniqueJob("gpureshard2"), 2);
  cluster.Start();
  SaveOldLayout(cluster, 2, 2);
  // The new layout swaps the split dimensions: w by columns, e by rows, z as TP rows of 2 ranks.
  // Chunks of 16 KiB per peer and round: many rounds through both buffer sets, runs cut at chunk
  // boundaries.
  ::setenv("MEMENTO_RESHARD_CHUNK_BYTES", "16384", 1);
  std::mutex mu;
  std::vector<std::string> sources(2), mismatches(2), blobs(2);
  RunRanks(2, [&](int rank) {
    DeviceState state(rank,
                      {{"e", DType::kBF16, Must(SplitEvenly({1000, 96}, 0, 2, rank)), 1},
                       {"w", DType::kF32, Must(SplitEvenly({64, 1000}, 1, 2, rank)), 0},
                       {"z", DType::kI64, Must(SplitAlongDim({333, 7}, 0, {100, 233}, rank)), 2}},
                      false);
    auto c = cluster.Connect(rank, 2, rank, 0);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    ASSERT_TRUE(state.Register(c->get()).ok());
    auto r = (*c)->Restore();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->step, 6);
    std::lock_guard<std::mutex> lock(mu);
    sources[rank] = r->source;
    mismatches[rank] = state.Mismatch();
    blobs[rank] = std::string(state.blob.data(), state.blob_size);
  });
  ::unsetenv("MEMENTO_RESHARD_CHUNK_BYTES");
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(sources[r], "memory (resharded from world size 2)");
    EXPECT_EQ(mismatches[r], "") << "rank " << r;
    EXPECT_EQ(blobs[r], "rank " + std::to_string(r) + " step 6");
  }
}

}  // namespace
}  // namespace memento::testing
