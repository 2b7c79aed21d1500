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

}  // namespace
}  // namespace memento
