// Client library against a real agent: bit-exact round trips for every dtype and for blobs,
// retained versions, the C API, and clear errors for bad calls.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "integration/harness.h"
#include "snapshot/cuda_copier.h"
#include "snapshot/memento.h"

namespace memento::testing {
namespace {

TEST(ClientTest, TwoRanksRoundTripBitExact) {
  AgentCluster cluster(UniqueJob("roundtrip"), 1);
  cluster.Start();
  RunRanks(2, [&](int rank) {
    auto c = cluster.Connect(rank, 2, 0, rank);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    RankState s(3, 10000 + rank);
    ASSERT_TRUE(s.Register(c->get()).ok());
    ASSERT_TRUE((*c)->FinishRegistration().ok());
    for (int64_t step = 1; step <= 4; ++step) {
      s.Fill(rank, step);
      ASSERT_TRUE((*c)->Snapshot(step).ok());
      ASSERT_TRUE((*c)->WaitUntilSafeToUpdate().ok());
      ASSERT_TRUE(WaitGloballyComplete(c->get(), step));
    }
    s.Clear();
    auto r = (*c)->Restore();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->step, 4);
    EXPECT_TRUE(s.Matches(rank, 4));
    // The two previous versions are still held (R = 3) and restore exactly; the one before is
    // evicted.
    auto r3 = (*c)->Restore(3);
    ASSERT_TRUE(r3.ok()) << r3.status().ToString();
    EXPECT_TRUE(s.Matches(rank, 3));
    auto r2 = (*c)->Restore(2);
    ASSERT_TRUE(r2.ok()) << r2.status().ToString();
    EXPECT_TRUE(s.Matches(rank, 2));
    auto r1 = (*c)->Restore(1);
    EXPECT_EQ(r1.status().code(), StatusCode::kNotFound);
    EXPECT_NE(r1.status().message().find("version 1 is not a globally complete version on node 0"), std::string::npos)
        << r1.status().message();
  });
}

TEST(ClientTest, EveryDTypeRoundTripsBitExact) {
  AgentCluster cluster(UniqueJob("dtypes"), 1);
  cluster.Start();
  auto c = cluster.Connect(0, 1, 0, 0);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  const DType kAll[] = {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3, DType::kF8E5M2,
                        DType::kI64, DType::kI32, DType::kI8,  DType::kU8,   DType::kBool};
  std::vector<std::vector<uint8_t>> bufs;
  const int64_t elems = 777;  // odd on purpose: no tensor ends on an aligned boundary
  for (DType t : kAll) bufs.emplace_back(elems * DTypeSize(t));
  for (size_t i = 0; i < bufs.size(); ++i) {
    ASSERT_TRUE((*c)->RegisterTensor(std::string(DTypeName(kAll[i])), bufs[i].data(), kAll[i], WholeTensor({elems})).ok());
  }
  for (size_t i = 0; i < bufs.size(); ++i) FillPattern(bufs[i].data(), bufs[i].size(), 100 + i);
  auto expect = bufs;
  ASSERT_TRUE((*c)->Snapshot(7).ok());
  ASSERT_TRUE((*c)->WaitUntilSafeToUpdate().ok());
  ASSERT_TRUE(WaitGloballyComplete(c->get(), 7));
  for (auto& b : bufs) std::fill(b.begin(), b.end(), 0);
  auto r = (*c)->Restore();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->step, 7);
  for (size_t i = 0; i < bufs.size(); ++i) EXPECT_EQ(bufs[i], expect[i]) << DTypeName(kAll[i]);
  EXPECT_EQ((*c)->last_capture().step, 7);
  EXPECT_EQ((*c)->last_capture().bytes, [&] {
    uint64_t n = 0;
    for (auto& b : bufs) n += b.size();
    return n;
  }());
}

TEST(ClientTest, BlobOverCapacityIsRefusedAndNothingIsCaptured) {
  AgentCluster cluster(UniqueJob("blobcap"), 1);
  cluster.Start();
  auto c = cluster.Connect(0, 1, 0, 0);
  ASSERT_TRUE(c.ok());
  char blob[16] = {};
  size_t size = 17;
  ASSERT_TRUE((*c)->RegisterBlob("rng", blob, sizeof blob, &size).ok());
  Status st = (*c)->Snapshot(1);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "blob 'rng' holds 17 bytes, more than its capacity of 16");
  auto v = (*c)->ListVersions();
  ASSERT_TRUE(v.ok());
  EXPECT_TRUE(v->empty());
}

TEST(ClientTest, RestoreWithNothingSavedIsNotFound) {
  AgentCluster cluster(UniqueJob("empty"), 1);
  cluster.Start();
  auto c = cluster.Connect(0, 1, 0, 0);
  ASSERT_TRUE(c.ok());
  RankState s(1, 10);
  ASSERT_TRUE(s.Register(c->get()).ok());
  auto r = (*c)->Restore();
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(r.status().message(),
            "rank 0: no globally complete version to restore on node 0; nothing of this job was saved yet (no "
            "version was ever complete on every node, no checkpoint committed)");
}

// Slots are reserved when a rank registers: more than /dev/shm holds is refused then, naming the
// rank, the size and the free space, and no slot is left behind.
TEST(ClientTest, SlotsLargerThanSharedMemoryAreRefusedAtRegistration) {
  AgentCluster cluster(UniqueJob("noshm"), 1);
  cluster.Start();
  auto c = cluster.Connect(0, 1, 0, 0);
  ASSERT_TRUE(c.ok());
  // The client reads a tensor's bytes only when it captures: a small buffer stands in for 1 TiB.
  float x[4] = {};
  ASSERT_TRUE((*c)->RegisterTensor("huge", x, DType::kF32, WholeTensor({int64_t{1} << 38})).ok());
  Status st = (*c)->FinishRegistration();
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
  EXPECT_EQ(st.message().rfind("rank 0: needs 3.0 TiB of shared memory for 3 slots, but /dev/shm has ", 0), 0u)
      << st.message();
  EXPECT_EQ(st.message().substr(st.message().size() - 5), " free") << st.message();
  // No slot was made.
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
    EXPECT_EQ(e.path().filename().string().find(cluster.job()), std::string::npos) << e.path();
  }
}

TEST(ClientTest, ConnectWithoutAgentNamesTheSocket) {
  ClientOptions o;
  o.agent_socket = TestTmp() + "/no-such-agent.sock";
  o.job_id = "nobody";
  o.rank = 0;
  o.world_size = 1;
  o.connect_timeout_ms = 100;
  auto c = Client::Connect(o);
  EXPECT_EQ(c.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(c.status().message().find("cannot connect to the memento agent at " + o.agent_socket), std::string::npos)
      << c.status().message();
}

TEST(ClientTest, CudaTensorWithoutDeviceSaysWhy) {
  if (CudaCopier::Available().ok()) GTEST_SKIP() << "a CUDA device is present; covered by the gpu tests";
  AgentCluster cluster(UniqueJob("nocuda"), 1);
  cluster.Start();
  auto c = cluster.Connect(0, 1, 0, 0);
  ASSERT_TRUE(c.ok());
  float x[4];
  Status st = (*c)->RegisterTensor("w", x, DType::kF32, WholeTensor({4}), MemoryKind::kCuda, 0);
  EXPECT_EQ(st.code(), StatusCode::kNotSupported);
  EXPECT_NE(st.message().find("tensor 'w' is on a CUDA device"), std::string::npos) << st.message();
}

TEST(ClientTest, CApiRoundTrip) {
  AgentCluster cluster(UniqueJob("capi"), 1);
  cluster.Start();
  std::string sock = cluster.SocketPattern();
  memento_client* c = nullptr;
  ASSERT_EQ(memento_connect(sock.c_str(), cluster.job().c_str(), "", 0, 0, 1, &c), 0) << memento_last_error();
  std::vector<int32_t> w(64 * 8);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<int32_t>(i * 7);
  int64_t shape[2] = {128, 8}, off[2] = {64, 0}, len[2] = {64, 8};
  ASSERT_EQ(memento_register_tensor(c, "w", w.data(), w.size() * 4, MEMENTO_I32, 2, shape, off, len, 0, MEMENTO_HOST, 0), 0)
      << memento_last_error();
  std::vector<double> flat(10, 2.5);
  int64_t fshape[1] = {40};
  ASSERT_EQ(memento_register_flat(c, "f", flat.data(), flat.size() * 8, MEMENTO_F64, 1, fshape, 30, 10, 0, MEMENTO_HOST, 0), 0)
      << memento_last_error();
  char blob[8] = "abc";
  size_t blob_size = 3;
  ASSERT_EQ(memento_register_blob(c, "b", blob, sizeof blob, &blob_size), 0);
  ASSERT_EQ(memento_snapshot(c, 5), 0) << memento_last_error();
  ASSERT_EQ(memento_wait_until_safe_to_update(c), 0) << memento_last_error();
  auto expect = w;
  std::fill(w.begin(), w.end(), 0);
  std::fill(flat.begin(), flat.end(), 0.0);
  blob_size = 0;
  int64_t restored = -1;
  // The version turns globally complete within a few rounds.
  WaitUntil([&] { return memento_restore(c, -1, &restored) == 0; }, 30000);
  EXPECT_EQ(restored, 5);
  EXPECT_EQ(w, expect);
  EXPECT_EQ(flat, std::vector<double>(10, 2.5));
  EXPECT_EQ(std::string(blob, blob_size), "abc");
  // Errors come back as codes with a message.
  EXPECT_EQ(memento_register_tensor(c, "late", w.data(), 4, MEMENTO_I32, 1, shape, nullptr, nullptr, 0, 0, 0),
            static_cast<int>(StatusCode::kFailedPrecondition));
  EXPECT_STREQ(memento_last_error(), "FailedPrecondition: tensor 'late' registered after FinishRegistration()");
  memento_close(c);
}

}  // namespace
}  // namespace memento::testing
