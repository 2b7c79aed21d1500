// CUDA capture and restore against a real agent: every dtype bit-exact from device memory.
// Skips, saying why, when the build has no CUDA or the machine no device.
#include <gtest/gtest.h>

#include "integration/harness.h"
#include "snapshot/cuda_copier.h"

#ifdef MEMENTO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace memento::testing {
namespace {

TEST(GpuTest, EveryDTypeCapturesAndRestoresBitExactFromDeviceMemory) {
  Status avail = CudaCopier::Available();
  if (!avail.ok()) GTEST_SKIP() << "skipped: " << avail.message();
#ifdef MEMENTO_WITH_CUDA
  AgentCluster cluster(UniqueJob("gpu"), 1);
  cluster.Start();
  auto c = cluster.Connect(0, 1, 0, 0);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  const DType kAll[] = {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3, DType::kF8E5M2,
                        DType::kI64, DType::kI32, DType::kI8,  DType::kU8,   DType::kBool};
  const int64_t elems = (int64_t{3} << 20) + 5;  // crosses copy chunks and ends unaligned
  std::vector<void*> dev;
  std::vector<std::vector<uint8_t>> host;
  for (size_t i = 0; i < std::size(kAll); ++i) {
    const size_t bytes = elems * DTypeSize(kAll[i]);
    void* p = nullptr;
    ASSERT_EQ(cudaMalloc(&p, bytes), cudaSuccess);
    dev.push_back(p);
    host.emplace_back(bytes);
    FillPattern(host.back().data(), bytes, 7 + i);
    ASSERT_EQ(cudaMemcpy(p, host.back().data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_TRUE((*c)->RegisterTensor(std::string(DTypeName(kAll[i])), p, kAll[i], WholeTensor({elems}),
                                     MemoryKind::kCuda, 0)
                    .ok());
  }
  ASSERT_TRUE((*c)->Snapshot(1).ok());
  ASSERT_TRUE((*c)->WaitUntilSafeToUpdate().ok());
  ASSERT_TRUE(WaitGloballyComplete(c->get(), 1));
  for (size_t i = 0; i < dev.size(); ++i) ASSERT_EQ(cudaMemset(dev[i], 0, host[i].size()), cudaSuccess);
  auto r = (*c)->Restore();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->step, 1);
  for (size_t i = 0; i < dev.size(); ++i) {
    std::vector<uint8_t> back(host[i].size());
    ASSERT_EQ(cudaMemcpy(back.data(), dev[i], back.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(back, host[i]) << DTypeName(kAll[i]);
    cudaFree(dev[i]);
  }
#endif
}

}  // namespace
}  // namespace memento::testing
