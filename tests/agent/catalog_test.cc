// Catalog on a real RocksDB in a temporary directory: records survive reopening.
#include "agent/catalog.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

namespace memento {
namespace {

std::string TempDir(const std::string& name) {
  const char* t = std::getenv("MEMENTO_TEST_TMP");
  std::string d = std::string(t ? t : "/tmp") + "/catalog-" + name + "-" + std::to_string(::getpid());
  std::filesystem::remove_all(d);
  return d;
}

TEST(CatalogTest, RecordsSurviveReopen) {
  const std::string dir = TempDir("reopen");
  {
    auto c = Catalog::Open(dir);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_EQ((*c)->GetNode().status().code(), StatusCode::kNotFound);
    proto::NodeRecord n;
    n.set_job_id("j");
    n.set_node_id(3);
    n.set_incarnation(9);
    ASSERT_TRUE((*c)->PutNode(n).ok());
    for (int64_t step : {12, 3, 100}) {
      proto::VersionRecord v;
      v.set_step(step);
      v.set_slot_index(static_cast<int32_t>(step % 2));
      v.set_state(proto::VERSION_GLOBALLY_COMPLETE);
      ASSERT_TRUE((*c)->PutVersion(v).ok());
    }
    proto::RankRecord r;
    r.set_rank(5);
    r.add_slot_names("/x-s0");
    ASSERT_TRUE((*c)->PutRank(r).ok());
    ASSERT_TRUE((*c)->DeleteVersion(12).ok());
  }
  auto c = Catalog::Open(dir);
  ASSERT_TRUE(c.ok());
  auto n = (*c)->GetNode();
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(n->job_id(), "j");
  EXPECT_EQ(n->incarnation(), 9u);
  auto vs = (*c)->ListVersions();
  ASSERT_TRUE(vs.ok());
  ASSERT_EQ(vs->size(), 2u);
  EXPECT_EQ((*vs)[0].step(), 3);  // ordered by step, numerically
  EXPECT_EQ((*vs)[1].step(), 100);
  auto rs = (*c)->ListRanks();
  ASSERT_TRUE(rs.ok());
  ASSERT_EQ(rs->size(), 1u);
  EXPECT_EQ((*rs)[0].slot_names(0), "/x-s0");
  std::filesystem::remove_all(dir);
}

TEST(CatalogTest, SecondOpenOfALiveCatalogFailsWithIOError) {
  const std::string dir = TempDir("lock");
  auto a = Catalog::Open(dir);
  ASSERT_TRUE(a.ok());
  auto b = Catalog::Open(dir);
  EXPECT_FALSE(b.ok());
  EXPECT_NE(b.status().message().find("opening catalog " + dir), std::string::npos) << b.status().message();
  std::filesystem::remove_all(dir);
}

proto::RegionCrc Region(uint64_t offset, uint64_t bytes, uint64_t chunk, int crcs) {
  proto::RegionCrc r;
  r.set_name("w");
  r.set_offset(offset);
  r.set_bytes(bytes);
  r.set_chunk_bytes(chunk);
  for (int c = 0; c < crcs; ++c) r.add_chunk_crcs(0);
  return r;
}

// Found writing tests/fuzz/fuzz_catalog_record.cc (which now checks it): the agent's check of a
// version's CRC records (offset + bytes <= slot) wrapped around for offsets near 2^64, and never
// compared the number of CRCs with the region's chunks, so a damaged record made the agent read
// outside the slot.
TEST(CatalogTest, CrcRecordsOutsideTheSlotOrWithTheWrongChunkCountAreRefused) {
  EXPECT_TRUE(CheckRegionCrc(Region(4096, 10000, 4096, 3), 16384).ok());
  EXPECT_TRUE(CheckRegionCrc(Region(16384, 0, 4096, 1), 16384).ok());  // an empty region has one CRC
  EXPECT_EQ(CheckRegionCrc(Region(~uint64_t{0} - 4095, 8192, 4096, 2), 16384).ToString(),
            "DataLoss: catalog CRC record of 'w': 8192 bytes at 18446744073709547520 lie outside the slot of 16384");
  EXPECT_EQ(CheckRegionCrc(Region(0, 10, 4096, 3), 4096).ToString(),
            "DataLoss: catalog CRC record of 'w': 3 CRCs for 10 bytes in chunks of 4096");
  EXPECT_EQ(CheckRegionCrc(Region(0, 10, 0, 1), 4096).ToString(), "DataLoss: catalog CRC record of 'w': chunk size 0");
  const proto::RegionCrc r = Region(4096, 10000, 4096, 3);
  EXPECT_EQ(RegionChunk(r, 0), std::make_pair(uint64_t{4096}, uint64_t{8192}));
  EXPECT_EQ(RegionChunk(r, 2), std::make_pair(uint64_t{12288}, uint64_t{14096}));
}

TEST(CatalogTest, RankLayoutsOutsideTheSlotAreRefused) {
  proto::RankRecord r;
  r.set_rank(2);
  r.set_slot_bytes(8192);
  proto::TensorRecord* t = r.add_tensors();
  t->set_name("w");
  t->set_slot_offset(4096);
  t->set_bytes(4096);
  proto::BlobRecord* b = r.add_blobs();
  b->set_name("rng");
  b->set_capacity(4088);
  EXPECT_TRUE(CheckRankLayout(r).ok());
  t->set_bytes(~uint64_t{0});
  EXPECT_EQ(CheckRankLayout(r).ToString(),
            "DataLoss: catalog record of rank 2: tensor 'w' of 18446744073709551615 bytes at 4096 lies outside the slot "
            "of 8192");
  t->set_bytes(4096);
  b->set_capacity(8185);
  EXPECT_EQ(CheckRankLayout(r).ToString(),
            "DataLoss: catalog record of rank 2: blob 'rng' of capacity 8185 at 0 lies outside the slot of 8192");
}

}  // namespace
}  // namespace memento
