// StripeLayout: the worked example of docs/erasure.md, the layout invariants for every group size,
// whole-group encode by partial parities and by stripes, and bit-exact rebuild of every pattern of
// lost members in groups of 4, 5 and 6.
#include "erasure/stripe.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <random>
#include <set>

namespace memento {
namespace {

using Buffers = std::vector<std::vector<uint8_t>>;

StripeLayout MakeLayout(const std::string& scheme, int n) {
  Result<StripeLayout> layout = StripeLayout::Create(*Scheme::Parse(scheme), n);
  EXPECT_TRUE(layout.ok()) << scheme << " N=" << n << ": " << layout.status().ToString();
  return *layout;
}

std::unique_ptr<Codec> MakeCodec(const StripeLayout& layout) {
  Result<std::unique_ptr<Codec>> codec = Codec::Create(layout.scheme(), layout.k());
  EXPECT_TRUE(codec.ok()) << codec.status().ToString();
  return std::move(codec).value();
}

// "0, 1, 2", as error messages list members.
std::string Ids(const std::vector<int>& ids) {
  std::string s;
  for (int id : ids) s += (s.empty() ? "" : ", ") + std::to_string(id);
  return s;
}

// Every subset of 0..n-1 with exactly `size` members.
std::vector<std::vector<int>> Subsets(int n, int size) {
  std::vector<std::vector<int>> out;
  for (uint32_t mask = 0; mask < (1u << n); ++mask) {
    if (std::popcount(mask) != size) continue;
    std::vector<int> s;
    for (int i = 0; i < n; ++i) {
      if (mask & (1u << i)) s.push_back(i);
    }
    out.push_back(s);
  }
  return out;
}

// A group whose members hold different amounts of data, padded (with zeros) to one length.
struct Group {
  Buffers data;
  Buffers parity;
};

Group MakeGroup(const StripeLayout& layout, std::mt19937_64& rng) {
  std::vector<size_t> raw(layout.group_size());
  for (auto& r : raw) r = std::uniform_int_distribution<size_t>(1, 5000)(rng);
  const size_t padded = layout.PaddedLength(*std::max_element(raw.begin(), raw.end()));
  Group g;
  for (int i = 0; i < layout.group_size(); ++i) {
    g.data.emplace_back(padded, 0);
    for (size_t b = 0; b < raw[i]; ++b) g.data[i][b] = static_cast<uint8_t>(rng());
    g.parity.emplace_back(layout.ParityLength(padded), 0);
  }
  return g;
}

TEST(StripeLayoutTest, WorkedExampleOfFourNodesAndTwoParities) {
  const StripeLayout layout = MakeLayout("rs:2", 4);
  EXPECT_EQ(layout.k(), 2);
  EXPECT_EQ(layout.m(), 2);
  const std::vector<std::vector<int>> holders = {{0, 1}, {1, 2}, {2, 3}, {3, 0}};
  const std::vector<std::vector<int>> contributors = {{2, 3}, {3, 0}, {0, 1}, {1, 2}};
  // segment[member][stripe]
  const std::vector<std::vector<int>> segment = {{-1, 1, 0, -1}, {-1, -1, 1, 0}, {0, -1, -1, 1}, {1, 0, -1, -1}};
  const std::vector<std::vector<std::pair<int, int>>> held = {
      {{0, 0}, {3, 1}}, {{1, 0}, {0, 1}}, {{2, 0}, {1, 1}}, {{3, 0}, {2, 1}}};
  for (int s = 0; s < 4; ++s) {
    EXPECT_EQ(layout.HolderIndex(s, 0), holders[s][0]);
    EXPECT_EQ(layout.HolderIndex(s, 1), holders[s][1]);
    EXPECT_EQ(layout.ContributorsOf(s), contributors[s]);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(layout.SegmentOf(i, s), segment[i][s]) << "member " << i << " stripe " << s;
  }
  for (int i = 0; i < 4; ++i) EXPECT_EQ(layout.ParityHeldBy(i), held[i]);
  EXPECT_EQ(layout.PaddedLength(1000), 1024u);  // a multiple of k * 64 = 128
  EXPECT_EQ(layout.SegmentLength(1024), 512u);
  EXPECT_EQ(layout.ParityLength(1024), 1024u);
  EXPECT_EQ(layout.PaddedLength(0), 0u);
  EXPECT_EQ(layout.PaddedLength(128), 128u);
}

TEST(StripeLayoutTest, ReplicateCopiesEachNodeToTheNextOnes) {
  const StripeLayout layout = MakeLayout("replicate:3", 4);
  EXPECT_EQ(layout.k(), 1);
  EXPECT_EQ(layout.m(), 2);
  EXPECT_EQ(layout.ContributorsOf(2), (std::vector<int>{2}));
  EXPECT_EQ(layout.HolderIndex(2, 0), 3);
  EXPECT_EQ(layout.HolderIndex(2, 1), 0);
  EXPECT_EQ(layout.SegmentOf(2, 2), 0);
  EXPECT_EQ(layout.SegmentOf(3, 2), -1);
  EXPECT_EQ(layout.SegmentOf(1, 2), -1);
  EXPECT_EQ(layout.ParityHeldBy(0), (std::vector<std::pair<int, int>>{{3, 0}, {2, 1}}));
  EXPECT_EQ(layout.PaddedLength(1000), 1024u);
  EXPECT_EQ(layout.SegmentLength(1024), 1024u);
  EXPECT_EQ(layout.ParityLength(1024), 2048u);
}

// For every group size and m: each stripe's contributors and holders partition the group (rs,
// xor) or are distinct (replicate); each member gives its segments 0..k-1 to distinct stripes, as
// their codec data index; ParityHeldBy agrees with HolderIndex.
TEST(StripeLayoutTest, InvariantsHoldForEveryGroupSize) {
  for (int n = 2; n <= 12; ++n) {
    for (int m = 1; m < n && m <= 4; ++m) {
      for (const std::string& scheme : {"rs:" + std::to_string(m), "replicate:" + std::to_string(m + 1)}) {
        const StripeLayout layout = MakeLayout(scheme, n);
        const bool replicate = scheme[0] == 'r' && scheme[1] == 'e';
        const std::string what = scheme + " N=" + std::to_string(n);
        std::vector<std::set<int>> segments_of(n);
        for (int s = 0; s < n; ++s) {
          std::set<int> members;
          const std::vector<int> contributors = layout.ContributorsOf(s);
          ASSERT_EQ(static_cast<int>(contributors.size()), layout.k()) << what;
          for (int t = 0; t < layout.k(); ++t) {
            members.insert(contributors[t]);
            EXPECT_EQ(layout.SegmentOf(contributors[t], s), t) << what;
            segments_of[contributors[t]].insert(t);
          }
          for (int j = 0; j < m; ++j) {
            const int h = layout.HolderIndex(s, j);
            members.insert(h);
            EXPECT_EQ(layout.SegmentOf(h, s), -1) << what;
            EXPECT_EQ(layout.ParityHeldBy(h)[j], std::make_pair(s, j)) << what;
          }
          EXPECT_EQ(static_cast<int>(members.size()), layout.k() + m) << what << " stripe " << s;
          if (!replicate) {
            EXPECT_EQ(static_cast<int>(members.size()), n) << what;
          }
        }
        for (int i = 0; i < n; ++i) {
          EXPECT_EQ(static_cast<int>(segments_of[i].size()), layout.k()) << what << " member " << i;
          EXPECT_EQ(static_cast<int>(layout.ParityHeldBy(i).size()), m) << what;
        }
      }
    }
  }
}

TEST(StripeLayoutTest, CreateRejectsGroupsTooSmall) {
  const std::pair<std::pair<const char*, int>, const char*> cases[] = {
      {{"none", 4}, "scheme none has no stripe layout: it keeps no redundancy"},
      {{"rs:2", 2}, "scheme rs:2 needs a group of at least 3 members (m parity holders and a data node per "
                    "stripe), got 2"},
      {{"xor", 1}, "scheme xor needs a group of at least 2 members (m parity holders and a data node per stripe), "
                   "got 1"},
      {{"replicate:3", 2}, "scheme replicate:3 needs a group of at least 3 members (every copy on its own node), "
                           "got 2"},
  };
  for (const auto& [input, message] : cases) {
    Result<StripeLayout> layout = StripeLayout::Create(*Scheme::Parse(input.first), input.second);
    ASSERT_FALSE(layout.ok()) << message;
    EXPECT_EQ(layout.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(layout.status().message(), message);
  }
}

// The matrix: groups of 4, 5 and 6 with rs:1, rs:2, xor, replicate:2 (and replicate:3):
// every combination of up to m lost members rebuilds data and parity bit-exact; m + 1 lost
// members (rs, xor) fail naming the count and what the scheme tolerates, writing nothing.
TEST(StripeRebuildTest, EveryLossOfUpToMMembersRebuildsBitExact) {
  std::mt19937_64 rng(2026);
  int rebuilds = 0;
  int refusals = 0;
  for (int n : {4, 5, 6}) {
    for (const char* scheme : {"rs:1", "rs:2", "xor", "replicate:2", "replicate:3"}) {
      const StripeLayout layout = MakeLayout(scheme, n);
      auto codec = MakeCodec(layout);
      Group g = MakeGroup(layout, rng);
      ASSERT_TRUE(EncodeLocally(layout, *codec, g.data, &g.parity).ok());
      const int m = layout.m();
      for (int lost_count = 1; lost_count <= m; ++lost_count) {
        for (const std::vector<int>& lost : Subsets(n, lost_count)) {
          const std::string what = std::string(scheme) + " N=" + std::to_string(n) + " lost {" + Ids(lost) + "}";
          Group work = g;
          for (int member : lost) {
            std::fill(work.data[member].begin(), work.data[member].end(), 0xee);
            std::fill(work.parity[member].begin(), work.parity[member].end(), 0x11);
          }
          Status st = RebuildLocally(layout, *codec, lost, &work.data, &work.parity);
          ASSERT_TRUE(st.ok()) << what << ": " << st.ToString();
          for (int i = 0; i < n; ++i) {
            ASSERT_EQ(work.data[i], g.data[i]) << what << " data of " << i;
            ASSERT_EQ(work.parity[i], g.parity[i]) << what << " parity of " << i;
          }
          ++rebuilds;
        }
      }
      if (layout.scheme().kind == Scheme::Kind::kReplicate) continue;
      for (const std::vector<int>& lost : Subsets(n, m + 1)) {
        Group work = g;
        Status st = RebuildLocally(layout, *codec, lost, &work.data, &work.parity);
        EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
        EXPECT_EQ(st.message(), "cannot rebuild: " + std::to_string(m + 1) + " of " + std::to_string(n) +
                                    " members lost (" + Ids(lost) +
                                    "), scheme " + scheme + " tolerates " + std::to_string(m));
        EXPECT_EQ(work.data, g.data);
        EXPECT_EQ(work.parity, g.parity);
        ++refusals;
      }
    }
  }
  // Sum over N of C(N,1) for rs:1, xor, replicate:2 and C(N,1) + C(N,2) for rs:2, replicate:3.
  EXPECT_EQ(rebuilds, (4 + 5 + 6) * 3 + (4 + 6 + 5 + 10 + 6 + 15) * 2);
  EXPECT_EQ(refusals, (6 + 10 + 15) * 2 + (4 + 10 + 20));
}

// Exact messages with readable ids: ", " separated.
TEST(StripeRebuildTest, TooManyLossesNameTheCountAndTheTolerance) {
  const StripeLayout layout = MakeLayout("rs:2", 6);
  EXPECT_EQ(layout.CheckRecoverable({2, 0, 1}).message(),
            "cannot rebuild: 3 of 6 members lost (0, 1, 2), scheme rs:2 tolerates 2");
  EXPECT_TRUE(layout.CheckRecoverable({5, 0}).ok());
  EXPECT_TRUE(layout.CheckRecoverable({}).ok());
  EXPECT_EQ(layout.CheckRecoverable({6}).message(), "lost member 6 is outside the group 0..5");
  EXPECT_EQ(layout.CheckRecoverable({1, 1}).message(), "lost member 1 is listed twice");
}

// Replication survives more than m losses when no member loses its data and every copy.
TEST(StripeRebuildTest, ReplicationSurvivesNonAdjacentLossesBeyondM) {
  std::mt19937_64 rng(5);
  const StripeLayout layout = MakeLayout("replicate:2", 6);
  auto codec = MakeCodec(layout);
  Group g = MakeGroup(layout, rng);
  ASSERT_TRUE(EncodeLocally(layout, *codec, g.data, &g.parity).ok());
  Group work = g;
  for (int member : {0, 2, 4}) std::fill(work.data[member].begin(), work.data[member].end(), 0);
  for (int member : {0, 2, 4}) std::fill(work.parity[member].begin(), work.parity[member].end(), 0);
  ASSERT_TRUE(RebuildLocally(layout, *codec, {0, 2, 4}, &work.data, &work.parity).ok());
  EXPECT_EQ(work.data, g.data);
  EXPECT_EQ(work.parity, g.parity);

  Status st = RebuildLocally(layout, *codec, {1, 2}, &work.data, &work.parity);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(st.message(),
            "cannot rebuild: 2 of 6 members lost (1, 2), scheme replicate:2 tolerates 1: member 1's data and every "
            "copy of it (on 2) are gone");
  st = MakeLayout("replicate:3", 5).CheckRecoverable({4, 0, 1});
  EXPECT_EQ(st.message(),
            "cannot rebuild: 3 of 5 members lost (0, 1, 4), scheme replicate:3 tolerates 2: member 4's data and every "
            "copy of it (on 0, 1) are gone");
}

// Partial parities laid out for a reduce-scatter: XOR-ing block d over all members gives member
// d's parity, whole or window by window; and it equals the stripe-by-stripe encode.
TEST(StripeEncodeTest, PartialParitiesReduceScatterToEveryMembersParity) {
  std::mt19937_64 rng(11);
  for (int n : {3, 4, 5, 6, 8}) {
    for (const char* scheme : {"rs:1", "rs:2", "rs:3", "xor", "replicate:2", "replicate:3"}) {
      const Scheme parsed = *Scheme::Parse(scheme);
      if (n < parsed.m + 1) continue;
      const StripeLayout layout = MakeLayout(scheme, n);
      auto codec = MakeCodec(layout);
      Group g = MakeGroup(layout, rng);
      ASSERT_TRUE(EncodeLocally(layout, *codec, g.data, &g.parity).ok());
      const size_t padded = g.data[0].size();
      const size_t seg = layout.SegmentLength(padded);
      const int m = layout.m();
      const std::string what = std::string(scheme) + " N=" + std::to_string(n);
      // Windows: the whole segment, and three uneven pieces.
      const std::vector<std::pair<size_t, size_t>> windows = {{0, seg}, {0, 1}, {1, seg / 2}, {seg / 2 + 1, seg - seg / 2 - 1}};
      for (const auto& [offset, len] : windows) {
        std::vector<uint8_t> reduced(static_cast<size_t>(n) * m * len, 0);
        std::vector<uint8_t> partial(reduced.size(), 0xcc);
        for (int i = 0; i < n; ++i) {
          Status st = EncodePartialParity(layout, *codec, i, g.data[i].data(), padded, offset, len, partial.data());
          ASSERT_TRUE(st.ok()) << st.ToString();
          for (size_t b = 0; b < reduced.size(); ++b) reduced[b] ^= partial[b];
        }
        for (int d = 0; d < n; ++d) {
          for (int j = 0; j < m; ++j) {
            const uint8_t* got = reduced.data() + (static_cast<size_t>(d) * m + j) * len;
            const uint8_t* want = g.parity[d].data() + static_cast<size_t>(j) * seg + offset;
            ASSERT_TRUE(std::equal(got, got + len, want))
                << what << " member " << d << " slot " << j << " window " << offset << "+" << len;
          }
        }
      }
    }
  }
}

TEST(StripeEncodeTest, RejectsMismatchedCodecsWindowsAndBuffers) {
  std::mt19937_64 rng(13);
  const StripeLayout layout = MakeLayout("rs:2", 5);
  auto codec = MakeCodec(layout);
  auto other = Codec::Create(*Scheme::Parse("rs:2"), 4);
  Group g = MakeGroup(layout, rng);
  Status st = EncodeLocally(layout, **other, g.data, &g.parity);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "codec rs:2 with k = 4 does not fit the stripe layout rs:2 with k = 3");
  const size_t padded = g.data[0].size();
  const size_t seg = layout.SegmentLength(padded);
  std::vector<uint8_t> out(5 * 2 * seg);
  st = EncodePartialParity(layout, *codec, 0, g.data[0].data(), padded, seg - 1, 2, out.data());
  EXPECT_EQ(st.message(), "window [" + std::to_string(seg - 1) + ", " + std::to_string(seg + 1) +
                              ") does not fit a segment of " + std::to_string(seg) + " bytes (padded length " +
                              std::to_string(padded) + ")");
  st = EncodePartialParity(layout, *codec, 5, g.data[0].data(), padded, 0, seg, out.data());
  EXPECT_EQ(st.message(), "member 5 is outside the group 0..4");
  g.parity[3].pop_back();
  st = EncodeLocally(layout, *codec, g.data, &g.parity);
  EXPECT_EQ(st.message(), "member 3 has " + std::to_string(padded) + " data and " +
                              std::to_string(layout.ParityLength(padded) - 1) + " parity bytes; expected " +
                              std::to_string(padded) + " and " + std::to_string(layout.ParityLength(padded)));
  g.parity.pop_back();
  st = RebuildLocally(layout, *codec, {0}, &g.data, &g.parity);
  EXPECT_EQ(st.message(), "group of 5 members given 5 data and 4 parity buffers");
}

}  // namespace
}  // namespace memento
