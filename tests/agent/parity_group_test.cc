// ParityGroup over real MPI (run under mpirun -np N): encode by partial parities and an XOR
// reduce-scatter, then every combination of up to m lost members rebuilds data and parity
// bit-exact from the survivors, by gathering and by chaining partial decodes, in one window and
// in many; more losses are refused.
#include <gtest/gtest.h>
#include <mpi.h>

#include <random>

#include "agent/mpi_communicator.h"
#include "agent/parity_group.h"

namespace memento {
namespace {

Communicator* World() {
  static std::unique_ptr<Communicator> world = MakeMpiCommunicator();
  return world.get();
}

// Every subset of {0..n-1} with at most `max` members, non-empty.
std::vector<std::vector<int>> Subsets(int n, int max) {
  std::vector<std::vector<int>> out;
  for (int mask = 1; mask < (1 << n); ++mask) {
    std::vector<int> s;
    for (int i = 0; i < n; ++i) {
      if (mask & (1 << i)) s.push_back(i);
    }
    if (static_cast<int>(s.size()) <= max) out.push_back(s);
  }
  return out;
}

void CheckScheme(const std::string& text) {
  SCOPED_TRACE(text);
  Communicator* world = World();
  auto scheme = Scheme::Parse(text);
  ASSERT_TRUE(scheme.ok());
  auto group = ParityGroup::Create(*scheme, world->size(), world, {});
  ASSERT_TRUE(group.ok()) << group.status().ToString();
  ParityGroup& g = **group;
  // Each member's data: two regions of different, odd sizes (like two ranks' slots).
  std::mt19937_64 rng(1000 + world->rank());
  const size_t a = 100000 + 37 * world->rank(), b = 54321 + world->rank();
  std::vector<uint8_t> r0(a), r1(b);
  for (auto& x : r0) x = static_cast<uint8_t>(rng());
  for (auto& x : r1) x = static_cast<uint8_t>(rng());
  NodeData data;
  data.Add(r0.data(), r0.size());
  data.Add(r1.data(), r1.size());
  // The group agrees on the padded length: the largest member's.
  uint64_t mine = data.size();
  std::vector<uint64_t> all(world->size());
  ASSERT_TRUE(world->Allgather(&mine, sizeof mine, all.data()).ok());
  const size_t padded = g.PaddedLength(*std::max_element(all.begin(), all.end()));
  std::vector<uint8_t> parity(g.ParityLength(padded));
  ASSERT_TRUE(g.Encode(data, padded, parity.data()).ok());
  // Sending segments to the holders computes the same parity as partial parities.
  std::vector<uint8_t> parity2(parity.size(), 0xEE);
  ASSERT_TRUE(g.EncodeToHolders(data, padded, parity2.data()).ok());
  EXPECT_EQ(parity2, parity);
  const auto r0_saved = r0, r1_saved = r1, parity_saved = parity;
  // Zeroing a lost member's memory destroys it (the data is not zeros already).
  ASSERT_NE(r0_saved, std::vector<uint8_t>(r0_saved.size(), 0));
  ASSERT_NE(parity_saved, std::vector<uint8_t>(parity_saved.size(), 0));
  // Both ways of rebuilding, with the default window (one window here) and with 4 KiB windows
  // (many: the chain's steps overlap windows, and the last window is short).
  using Method = ParityGroup::RebuildMethod;
  for (Method method : {Method::kAuto, Method::kGather, Method::kChain}) {
    for (size_t window : {size_t{8} << 20, size_t{4096}}) {
      SCOPED_TRACE(::testing::Message() << "method " << static_cast<int>(method) << ", window " << window);
      g.set_window_bytes(window);
      for (const auto& lost : Subsets(world->size(), g.scheme().m)) {
        const bool me = std::find(lost.begin(), lost.end(), g.index()) != lost.end();
        if (me) {  // a node loss: its memory is gone
          std::fill(r0.begin(), r0.end(), 0);
          std::fill(r1.begin(), r1.end(), 0);
          std::fill(parity.begin(), parity.end(), 0);
        }
        Status st = g.Rebuild(lost, &data, parity.data(), padded, method);
        ASSERT_TRUE(st.ok()) << st.ToString();
        EXPECT_EQ(r0, r0_saved);
        EXPECT_EQ(r1, r1_saved);
        EXPECT_EQ(parity, parity_saved);
      }
    }
  }
  // Encoding in many windows gives the same parity both ways.
  g.set_window_bytes(4096);
  std::vector<uint8_t> parity3(parity.size(), 0x11), parity4(parity.size(), 0x22);
  ASSERT_TRUE(g.Encode(data, padded, parity3.data()).ok());
  ASSERT_TRUE(g.EncodeToHolders(data, padded, parity4.data()).ok());
  EXPECT_EQ(parity3, parity_saved);
  EXPECT_EQ(parity4, parity_saved);
  g.set_window_bytes(size_t{8} << 20);
  // One more loss than the scheme tolerates: refused on every member, nothing written.
  std::vector<int> too_many;
  for (int i = 0; i <= g.scheme().m && i < world->size(); ++i) too_many.push_back(i);
  if (static_cast<int>(too_many.size()) > g.scheme().m && text.rfind("replicate", 0) != 0) {
    Status st = g.Rebuild(too_many, &data, parity.data(), padded);
    EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
    EXPECT_NE(st.message().find("members lost"), std::string::npos) << st.message();
    EXPECT_EQ(r0, r0_saved);
  }
}

TEST(ParityGroupTest, RsOne) { CheckScheme("rs:1"); }
TEST(ParityGroupTest, RsTwo) { CheckScheme("rs:2"); }
TEST(ParityGroupTest, Xor) { CheckScheme("xor"); }
TEST(ParityGroupTest, ReplicateTwo) { CheckScheme("replicate:2"); }

}  // namespace
}  // namespace memento

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  memento::Status st = memento::InitMpi(&argc, &argv);
  if (!st.ok()) return 1;
  // Only rank 0 prints results; every rank runs every test (they are collective).
  if (memento::World()->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS();
  int worst = 0;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  memento::FinalizeMpi();
  return worst;
}
