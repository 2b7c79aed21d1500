// Group membership: dealing over hosts and failure domains, remainders, and topology files.
#include "erasure/group.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <random>
#include <set>

namespace memento {
namespace {

using Groups = std::vector<std::vector<int>>;

std::vector<NodeInfo> Nodes(int count, int nodes_per_host = 1, int nodes_per_domain = 0) {
  std::vector<NodeInfo> nodes;
  for (int i = 0; i < count; ++i) {
    nodes.push_back({i, "host" + std::to_string(i / nodes_per_host),
                     nodes_per_domain > 0 ? "rack" + std::to_string(i / nodes_per_domain) : ""});
  }
  return nodes;
}

Groups MustGroup(const std::vector<NodeInfo>& nodes, int group_size) {
  Result<Groups> groups = MakeGroups(nodes, group_size);
  EXPECT_TRUE(groups.ok()) << groups.status().ToString();
  return groups.ok() ? *groups : Groups{};
}

// Every node in exactly one group, each group ascending, no host twice in a group.
void ExpectPartition(const std::vector<NodeInfo>& nodes, const Groups& groups) {
  std::multiset<int> seen;
  for (const auto& g : groups) {
    EXPECT_TRUE(std::is_sorted(g.begin(), g.end()));
    std::set<std::string> hosts;
    for (int id : g) {
      seen.insert(id);
      const auto it = std::find_if(nodes.begin(), nodes.end(), [&](const NodeInfo& n) { return n.node_id == id; });
      ASSERT_NE(it, nodes.end());
      EXPECT_TRUE(hosts.insert(it->host).second) << "host " << it->host << " twice in a group";
    }
  }
  std::multiset<int> all;
  for (const auto& n : nodes) all.insert(n.node_id);
  EXPECT_EQ(seen, all);
}

TEST(GroupTest, FourRacksOfFourGiveOneNodePerRackInEachGroup) {
  const std::vector<NodeInfo> nodes = Nodes(16, 1, 4);  // racks hold ids 0-3, 4-7, 8-11, 12-15
  const Groups groups = MustGroup(nodes, 4);
  ExpectPartition(nodes, groups);
  EXPECT_EQ(groups, (Groups{{0, 4, 8, 12}, {1, 5, 9, 13}, {2, 6, 10, 14}, {3, 7, 11, 15}}));
  for (const auto& g : groups) {
    std::set<std::string> racks;
    for (int id : g) racks.insert(nodes[id].domain);
    EXPECT_EQ(racks.size(), 4u);
  }
}

TEST(GroupTest, ResultDependsOnlyOnTheSetOfNodes) {
  std::vector<NodeInfo> nodes = Nodes(24, 2, 6);
  const Groups expected = MustGroup(nodes, 4);
  std::mt19937 rng(1);
  for (int round = 0; round < 5; ++round) {
    std::shuffle(nodes.begin(), nodes.end(), rng);
    EXPECT_EQ(MustGroup(nodes, 4), expected);
  }
}

TEST(GroupTest, UnevenDomainsAreSpreadAsFarAsTheGroupCountAllows) {
  // Racks of 5, 5 and 2 nodes in 3 groups of 4: no group holds more than ceil(5 / 3) = 2 of a rack.
  std::vector<NodeInfo> nodes;
  for (int i = 0; i < 12; ++i) nodes.push_back({i, "h" + std::to_string(i), i < 5 ? "a" : i < 10 ? "b" : "c"});
  const Groups groups = MustGroup(nodes, 4);
  ExpectPartition(nodes, groups);
  ASSERT_EQ(groups.size(), 3u);
  for (const auto& g : groups) {
    EXPECT_EQ(g.size(), 4u);
    std::map<std::string, int> per_rack;
    for (int id : g) ++per_rack[nodes[id].domain];
    for (const auto& [rack, count] : per_rack) EXPECT_LE(count, 2) << "rack " << rack;
  }
}

TEST(GroupTest, NodesOfOneHostLandInDistinctGroups) {
  const std::vector<NodeInfo> nodes = Nodes(8, 2);  // host0 runs 0 and 1, host1 runs 2 and 3, ...
  const Groups groups = MustGroup(nodes, 4);
  ExpectPartition(nodes, groups);
  EXPECT_EQ(groups, (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}}));
}

TEST(GroupTest, RemainderIsSpreadOneNodePerGroup) {
  EXPECT_EQ(MustGroup(Nodes(8), 4), (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}}));
  const Groups eleven = MustGroup(Nodes(11), 4);
  ExpectPartition(Nodes(11), eleven);
  ASSERT_EQ(eleven.size(), 2u);
  EXPECT_EQ(eleven[0].size(), 6u);
  EXPECT_EQ(eleven[1].size(), 5u);
  const Groups nine = MustGroup(Nodes(9), 4);
  ASSERT_EQ(nine.size(), 2u);
  EXPECT_EQ(nine[0].size(), 5u);
  EXPECT_EQ(nine[1].size(), 4u);
  EXPECT_EQ(MustGroup(Nodes(7), 4), (Groups{{0, 1, 2, 3, 4, 5, 6}}));
  EXPECT_EQ(MustGroup(Nodes(4), 4), (Groups{{0, 1, 2, 3}}));
}

TEST(GroupTest, RejectsWhatCannotBeGrouped) {
  auto message = [](const std::vector<NodeInfo>& nodes, int size) {
    Result<Groups> g = MakeGroups(nodes, size);
    EXPECT_FALSE(g.ok());
    EXPECT_EQ(g.status().code(), StatusCode::kInvalidArgument);
    return g.status().message();
  };
  EXPECT_EQ(message(Nodes(3), 4), "3 node(s) cannot form a group of 4: use a group size of at most 3 or more nodes");
  EXPECT_EQ(message(Nodes(3), 1), "group size must be at least 2 (a node cannot protect itself), got 1");
  // 8 nodes make 2 groups of 4, but host1 runs 3 of them.
  std::vector<NodeInfo> crowded = Nodes(8);
  for (int id : {2, 3, 4}) crowded[id].host = "shared";
  EXPECT_EQ(message(crowded, 4),
            "host 'shared' runs 3 nodes (2, 3, 4) but 8 nodes make only 2 group(s) of 4: two of them would share "
            "a group; use a smaller group size");
  EXPECT_EQ(message(Nodes(4, 2), 4),
            "host 'host0' runs 2 nodes (0, 1) but 4 nodes make only 1 group(s) of 4: two of them would share a "
            "group; use a smaller group size");
  std::vector<NodeInfo> twice = Nodes(4);
  twice[3].node_id = 1;
  EXPECT_EQ(message(twice, 2), "node 1 is listed twice");
  std::vector<NodeInfo> nameless = Nodes(4);
  nameless[2].host = "";
  EXPECT_EQ(message(nameless, 2), "node 2 has no host name");
  std::vector<NodeInfo> split = Nodes(4, 2, 4);
  split[1].domain = "rack9";
  EXPECT_EQ(message(split, 2), "host 'host0' is in two failure domains, 'rack0' and 'rack9' (node 1)");
  std::vector<NodeInfo> negative = Nodes(4);
  negative[0].node_id = -1;
  EXPECT_EQ(message(negative, 2), "node id must be non-negative, got -1");
}

TEST(TopologyTest, ParsesNodesDomainsAndComments) {
  Result<std::map<int, std::string>> t = ParseTopology(
      "# node rack\n"
      "0 rack-a\n"
      "\n"
      "  1\track-a   # trailing comment\n"
      "2 rack-b\r\n"
      "17 switch/3\n",
      "topo.txt");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(*t, (std::map<int, std::string>{{0, "rack-a"}, {1, "rack-a"}, {2, "rack-b"}, {17, "switch/3"}}));
  t = ParseTopology("", "empty");
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->empty());
}

TEST(TopologyTest, ErrorsNameTheFileAndLine) {
  const std::pair<const char*, const char*> cases[] = {
      {"0 a\n1\n", "topology t.txt:2: expected '<node_id> <domain>', got '1'"},
      {"0 a b\n", "topology t.txt:1: expected '<node_id> <domain>', got '0 a b'"},
      {"# c\nx a\n", "topology t.txt:2: node id 'x' is not a non-negative integer"},
      {"-3 a\n", "topology t.txt:1: node id '-3' is not a non-negative integer"},
      {"3x a\n", "topology t.txt:1: node id '3x' is not a non-negative integer"},
      {"0 a\n\n0 b\n", "topology t.txt:3: node 0 is listed again (first on line 1)"},
  };
  for (const auto& [text, message] : cases) {
    Result<std::map<int, std::string>> t = ParseTopology(text, "t.txt");
    ASSERT_FALSE(t.ok()) << text;
    EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(t.status().message(), message);
  }
}

TEST(TopologyTest, ReadsAFileAndAssignsDomains) {
  const char* tmp = std::getenv("MEMENTO_TEST_TMP");
  const std::string dir = tmp != nullptr ? tmp : ::testing::TempDir();
  const std::string path = dir + "/erasure_topology.txt";
  ASSERT_TRUE(WriteFileAtomically(PosixFileSystem(), path, "0 r0\n1 r1\n2 r0\n3 r1\n").ok());
  Result<std::map<int, std::string>> t = ReadTopology(path);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::vector<NodeInfo> nodes = Nodes(4);
  ASSERT_TRUE(AssignDomains(*t, &nodes).ok());
  EXPECT_EQ(nodes[2].domain, "r0");
  EXPECT_EQ(nodes[3].domain, "r1");
  EXPECT_EQ(MustGroup(nodes, 2), (Groups{{0, 1}, {2, 3}}));

  nodes.push_back({9, "host9", ""});
  Status st = AssignDomains(*t, &nodes);
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_EQ(st.message(), "node 9 (host 'host9') is not in the topology file");

  ASSERT_TRUE(WriteFileAtomically(PosixFileSystem(), path, "0 r0\nzero r1\n").ok());
  EXPECT_EQ(ReadTopology(path).status().message(),
            "topology " + path + ":2: node id 'zero' is not a non-negative integer");
  ASSERT_TRUE(PosixFileSystem()->RemoveFile(path).ok());
  t = ReadTopology(path);
  EXPECT_EQ(t.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(t.status().message(), "reading topology file: open(" + path + "): No such file or directory");
}

}  // namespace
}  // namespace memento
