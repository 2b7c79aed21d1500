// Codec: every scheme against a plain GF(2^8) reference (random k, m, lengths, data and erasure
// patterns from fixed seeds), every erasure pattern of small codes, partial parities and partial
// rebuilds, errors, and concurrent use of one codec.
#include "erasure/codec.h"

#include <gtest/gtest.h>
#include <isa-l/erasure_code.h>

#include <algorithm>
#include <bit>
#include <random>
#include <thread>

#include "tests/erasure/gf256_reference.h"

namespace memento {
namespace {

using Buffers = std::vector<std::vector<uint8_t>>;

std::unique_ptr<Codec> MakeCodec(const std::string& scheme, int k) {
  Result<Scheme> s = Scheme::Parse(scheme);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  Result<std::unique_ptr<Codec>> codec = Codec::Create(*s, k);
  EXPECT_TRUE(codec.ok()) << scheme << " k=" << k << ": " << codec.status().ToString();
  return codec.ok() ? std::move(codec).value() : nullptr;
}

Buffers RandomBuffers(std::mt19937_64& rng, int count, size_t len) {
  Buffers b(count, std::vector<uint8_t>(len));
  for (auto& v : b) {
    for (auto& x : v) x = static_cast<uint8_t>(rng());
  }
  return b;
}

std::vector<const uint8_t*> ConstPointers(const Buffers& b) {
  std::vector<const uint8_t*> p;
  for (const auto& v : b) p.push_back(v.data());
  return p;
}

std::vector<uint8_t*> Pointers(Buffers& b) {
  std::vector<uint8_t*> p;
  for (auto& v : b) p.push_back(v.data());
  return p;
}

Buffers Encoded(const Codec& codec, const Buffers& data) {
  Buffers parity(codec.m(), std::vector<uint8_t>(data[0].size(), 0xa5));
  codec.Encode(ConstPointers(data).data(), Pointers(parity).data(), data[0].size());
  return parity;
}

// The data then the parity: the k + m segments of one stripe.
Buffers Stripe(const Buffers& data, const Buffers& parity) {
  Buffers all = data;
  all.insert(all.end(), parity.begin(), parity.end());
  return all;
}

// Overwrites the erased segments with garbage, decodes, and checks every segment is restored.
void ExpectDecodeRestores(const Codec& codec, const Buffers& stripe, const std::vector<int>& erased,
                          std::mt19937_64& rng, const std::string& what) {
  Buffers work = stripe;
  for (int e : erased) {
    for (auto& x : work[e]) x = static_cast<uint8_t>(rng());
  }
  Status st = codec.Decode(Pointers(work).data(), erased, stripe[0].size());
  ASSERT_TRUE(st.ok()) << what << ": " << st.ToString();
  for (size_t i = 0; i < stripe.size(); ++i) ASSERT_EQ(work[i], stripe[i]) << what << " segment " << i;
}

// Partial rebuild: each source's ApplyUpdate into zeroed outputs, XOR-combined.
void ExpectPartialRebuildRestores(const Codec& codec, const Buffers& stripe, const std::vector<int>& erased,
                                  const std::string& what) {
  Result<DecodePlan> plan = codec.PlanDecode(erased);
  ASSERT_TRUE(plan.ok()) << what << ": " << plan.status().ToString();
  const size_t len = stripe[0].size();
  Buffers combined(plan->erased().size(), std::vector<uint8_t>(len, 0));
  for (size_t i = 0; i < plan->sources().size(); ++i) {
    Buffers partial(plan->erased().size(), std::vector<uint8_t>(len, 0));
    plan->ApplyUpdate(static_cast<int>(i), stripe[plan->sources()[i]].data(), Pointers(partial).data(), len);
    for (size_t e = 0; e < partial.size(); ++e) {
      for (size_t b = 0; b < len; ++b) combined[e][b] ^= partial[e][b];
    }
  }
  for (size_t e = 0; e < plan->erased().size(); ++e) {
    ASSERT_EQ(combined[e], stripe[plan->erased()[e]]) << what << " erased " << plan->erased()[e];
  }
}

std::vector<int> RandomErasures(std::mt19937_64& rng, int n, int max_count) {
  std::vector<int> all(n);
  for (int i = 0; i < n; ++i) all[i] = i;
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(std::uniform_int_distribution<int>(0, max_count)(rng));
  return all;  // in random order: Decode takes any order
}

std::string Describe(const Codec& c, size_t len, const std::vector<int>& erased) {
  std::string s = c.scheme().ToString() + " k=" + std::to_string(c.k()) + " len=" + std::to_string(len) + " erased={";
  for (int e : erased) s += std::to_string(e) + ",";
  return s + "}";
}

TEST(GfReferenceTest, MultiplyAndInverseMatchIsalForEveryPair) {
  for (int a = 0; a < 256; ++a) {
    for (int b = 0; b < 256; ++b) {
      ASSERT_EQ(gf256::Mul(static_cast<uint8_t>(a), static_cast<uint8_t>(b)),
                gf_mul(static_cast<unsigned char>(a), static_cast<unsigned char>(b)))
          << a << " * " << b;
    }
    if (a != 0) {
      ASSERT_EQ(gf256::Inv(static_cast<uint8_t>(a)), gf_inv(static_cast<unsigned char>(a))) << a;
      ASSERT_EQ(gf256::Mul(static_cast<uint8_t>(a), gf256::Inv(static_cast<uint8_t>(a))), 1) << a;
    }
  }
  EXPECT_EQ(gf256::Mul(0x80, 2), 0x1d);  // x^7 * x = x^8 = x^4 + x^3 + x^2 + 1
}

TEST(GfReferenceTest, CauchyGeneratorIsIsalsAndTheCodecs) {
  for (int k = 1; k <= 12; ++k) {
    for (int m = 1; m <= 4; ++m) {
      std::vector<uint8_t> isal(static_cast<size_t>(k + m) * k);
      gf_gen_cauchy1_matrix(isal.data(), k + m, k);
      EXPECT_EQ(gf256::CauchyMatrix(k, m), isal) << "k=" << k << " m=" << m;
      auto codec = MakeCodec("rs:" + std::to_string(m), k);
      ASSERT_NE(codec, nullptr);
      EXPECT_EQ(codec->generator(), isal) << "k=" << k << " m=" << m;
    }
  }
  EXPECT_EQ(MakeCodec("xor", 3)->generator(), (std::vector<uint8_t>{1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(MakeCodec("replicate:3", 1)->generator(), (std::vector<uint8_t>{1, 1, 1}));
}

// The property test: a few hundred random stripes per scheme kind, from fixed seeds.
TEST(CodecPropertyTest, RandomStripesMatchTheReferenceAndDecodeExactly) {
  const size_t fixed_lengths[] = {1, 7, 63, 64, 4097};
  int cases = 0;
  for (const char* kind : {"rs", "xor", "replicate"}) {
    std::mt19937_64 rng(0x5eed0000 + cases);
    const int count = std::string(kind) == "rs" ? 400 : 150;
    for (int c = 0; c < count; ++c, ++cases) {
      int k = std::uniform_int_distribution<int>(1, 12)(rng);
      int m = std::uniform_int_distribution<int>(1, 4)(rng);
      std::string scheme = "rs:" + std::to_string(m);
      std::vector<uint8_t> g;
      if (std::string(kind) == "xor") {
        m = 1;
        scheme = "xor";
      } else if (std::string(kind) == "replicate") {
        k = 1;
        scheme = "replicate:" + std::to_string(m + 1);
      }
      g = std::string(kind) == "rs" ? gf256::CauchyMatrix(k, m) : gf256::OnesMatrix(k, m);
      const size_t len = c % 2 == 0 ? fixed_lengths[(c / 2) % 5]
                                    : std::uniform_int_distribution<size_t>(1, 3000)(rng);
      auto codec = MakeCodec(scheme, k);
      ASSERT_NE(codec, nullptr);
      ASSERT_EQ(codec->generator(), g);
      const Buffers data = RandomBuffers(rng, k, len);
      const Buffers parity = Encoded(*codec, data);
      ASSERT_EQ(parity, gf256::Encode(g, k, m, data)) << Describe(*codec, len, {});

      // Partial parities: one data segment at a time into zeroed buffers, XOR-combined.
      Buffers combined(m, std::vector<uint8_t>(len, 0));
      for (int i = 0; i < k; ++i) {
        Buffers partial(m, std::vector<uint8_t>(len, 0));
        codec->EncodeUpdate(i, data[i].data(), Pointers(partial).data(), len);
        ASSERT_EQ(partial, gf256::Encode(g, k, m, [&] {
                    Buffers only(k, std::vector<uint8_t>(len, 0));
                    only[i] = data[i];
                    return only;
                  }()))
            << Describe(*codec, len, {}) << " partial of " << i;
        for (int j = 0; j < m; ++j) {
          for (size_t b = 0; b < len; ++b) combined[j][b] ^= partial[j][b];
        }
      }
      ASSERT_EQ(combined, parity) << Describe(*codec, len, {});

      const Buffers stripe = Stripe(data, parity);
      for (int trial = 0; trial < 3; ++trial) {
        const std::vector<int> erased = RandomErasures(rng, k + m, m);
        ExpectDecodeRestores(*codec, stripe, erased, rng, Describe(*codec, len, erased));
        ExpectPartialRebuildRestores(*codec, stripe, erased, Describe(*codec, len, erased));
      }
    }
  }
  EXPECT_EQ(cases, 700);
}

// Every erasure pattern of up to m segments, for every small code.
TEST(CodecTest, EveryErasurePatternOfSmallCodesDecodes) {
  std::mt19937_64 rng(42);
  std::vector<std::unique_ptr<Codec>> codecs;
  for (int k = 1; k <= 8; ++k) {
    for (int m = 1; m <= 4; ++m) codecs.push_back(MakeCodec("rs:" + std::to_string(m), k));
    codecs.push_back(MakeCodec("xor", k));
  }
  for (int r = 2; r <= 5; ++r) codecs.push_back(MakeCodec("replicate:" + std::to_string(r), 1));
  int patterns = 0;
  for (const auto& codec : codecs) {
    ASSERT_NE(codec, nullptr);
    const int n = codec->k() + codec->m();
    const size_t len = 100;
    const Buffers data = RandomBuffers(rng, codec->k(), len);
    const Buffers stripe = Stripe(data, Encoded(*codec, data));
    for (uint32_t mask = 0; mask < (1u << n); ++mask) {
      if (std::popcount(mask) > codec->m()) continue;
      std::vector<int> erased;
      for (int i = 0; i < n; ++i) {
        if (mask & (1u << i)) erased.push_back(i);
      }
      ExpectDecodeRestores(*codec, stripe, erased, rng, Describe(*codec, len, erased));
      ++patterns;
    }
  }
  EXPECT_EQ(patterns, 3510);
}

TEST(CodecTest, LongSegmentsOfOddLengthRoundTrip) {
  std::mt19937_64 rng(7);
  const size_t len = (size_t{3} << 20) + 13;
  for (const char* scheme : {"rs:4", "xor"}) {
    auto codec = MakeCodec(scheme, 10);
    const Buffers data = RandomBuffers(rng, 10, len);
    const Buffers stripe = Stripe(data, Encoded(*codec, data));
    const std::vector<uint8_t> g = std::string(scheme) == "xor" ? gf256::OnesMatrix(10, 1) : gf256::CauchyMatrix(10, 4);
    EXPECT_EQ(Buffers(stripe.begin() + 10, stripe.end()), gf256::Encode(g, 10, codec->m(), data)) << scheme;
    std::vector<int> erased = {0, 3, 9, 12};
    erased.resize(codec->m());
    ExpectDecodeRestores(*codec, stripe, erased, rng, scheme);
  }
}

// The send-to-holder path: a holder of parity j computes only its row, as a plan with every data
// segment present.
TEST(CodecTest, PlanForOneParityRowEncodesThatParity) {
  std::mt19937_64 rng(9);
  auto codec = MakeCodec("rs:3", 5);
  const Buffers data = RandomBuffers(rng, 5, 777);
  const Buffers parity = Encoded(*codec, data);
  for (int j = 0; j < 3; ++j) {
    Result<DecodePlan> plan = codec->PlanDecode({5 + j});
    ASSERT_TRUE(plan.ok()) << plan.status().ToString();
    EXPECT_EQ(plan->sources(), (std::vector<int>{0, 1, 2, 3, 4}));
    EXPECT_EQ(plan->erased(), (std::vector<int>{5 + j}));
    std::vector<uint8_t> out(777, 0);
    uint8_t* outputs[] = {out.data()};
    plan->Apply(ConstPointers(data).data(), outputs, 777);
    EXPECT_EQ(out, parity[j]) << "parity " << j;
  }
}

TEST(CodecTest, PlanReadsTheFirstKSurvivors) {
  auto codec = MakeCodec("rs:2", 4);
  Result<DecodePlan> plan = codec->PlanDecode({4, 1});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->erased(), (std::vector<int>{1, 4}));
  EXPECT_EQ(plan->sources(), (std::vector<int>{0, 2, 3, 5}));
  plan = codec->PlanDecode({});
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->erased().empty());
  EXPECT_TRUE(plan->sources().empty());
  auto replicate = MakeCodec("replicate:3", 1);
  plan = replicate->PlanDecode({0, 1});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->sources(), (std::vector<int>{2}));
}

TEST(CodecTest, TooManyOrBadErasuresFailAndWriteNothing) {
  std::mt19937_64 rng(3);
  auto codec = MakeCodec("rs:2", 4);
  const Buffers data = RandomBuffers(rng, 4, 64);
  const Buffers stripe = Stripe(data, Encoded(*codec, data));
  Buffers work = stripe;
  Status st = codec->Decode(Pointers(work).data(), {0, 2, 5}, 64);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(st.message(), "cannot decode: 3 erasures, scheme rs:2 tolerates 2");
  EXPECT_EQ(work, stripe);

  st = codec->Decode(Pointers(work).data(), {6}, 64);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "codec rs:2: erased segment 6 is outside 0..5 (k = 4, m = 2)");
  st = codec->Decode(Pointers(work).data(), {-1}, 64);
  EXPECT_EQ(st.message(), "codec rs:2: erased segment -1 is outside 0..5 (k = 4, m = 2)");
  st = codec->Decode(Pointers(work).data(), {1, 1}, 64);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "codec rs:2: erased segment 1 is listed twice");
  EXPECT_EQ(work, stripe);

  auto x = MakeCodec("xor", 3);
  EXPECT_EQ(x->PlanDecode({0, 3}).status().message(), "cannot decode: 2 erasures, scheme xor tolerates 1");
  auto rep = MakeCodec("replicate:2", 1);
  EXPECT_EQ(rep->PlanDecode({0, 1}).status().message(), "cannot decode: 2 erasures, scheme replicate:2 tolerates 1");
}

TEST(CodecTest, CreateRejectsWhatCannotWork) {
  const std::tuple<Scheme, int, const char*> cases[] = {
      {Scheme{}, 4, "scheme none has no codec: it keeps no redundancy"},
      {Scheme{Scheme::Kind::kReedSolomon, 2}, 0, "codec rs:2: k must be at least 1, got 0"},
      {Scheme{Scheme::Kind::kReplicate, 1}, 3, "codec replicate:2 copies whole segments: k must be 1, got 3"},
      {Scheme{Scheme::Kind::kReedSolomon, 4}, 253, "codec rs:4 with k = 253: k + m must be at most 256 in GF(2^8)"},
      {Scheme{Scheme::Kind::kXor, 2}, 4, "invalid scheme: xor with m = 2 (xor has m = 1)"},
      {Scheme{Scheme::Kind::kReedSolomon, 0}, 4, "invalid scheme rs:0: m = 0 is outside 1..32"},
  };
  for (const auto& [scheme, k, message] : cases) {
    Result<std::unique_ptr<Codec>> codec = Codec::Create(scheme, k);
    ASSERT_FALSE(codec.ok()) << message;
    EXPECT_EQ(codec.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(codec.status().message(), message);
  }
  auto widest = MakeCodec("rs:4", 252);
  ASSERT_NE(widest, nullptr);
  EXPECT_EQ(widest->k(), 252);
  EXPECT_EQ(widest->m(), 4);
}

TEST(CodecTest, OneCodecServesManyThreads) {
  auto codec = MakeCodec("rs:3", 6);
  const std::vector<uint8_t> g = gf256::CauchyMatrix(6, 3);
  std::vector<std::string> failures(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int round = 0; round < 50; ++round) {
        const size_t len = 1000 + 37 * t + round;
        const Buffers data = RandomBuffers(rng, 6, len);
        const Buffers parity = Encoded(*codec, data);
        if (parity != gf256::Encode(g, 6, 3, data)) failures[t] = "encode differs in round " + std::to_string(round);
        Buffers work = Stripe(data, parity);
        const std::vector<int> erased = {round % 9, (round + 4) % 9};
        for (int e : erased) std::fill(work[e].begin(), work[e].end(), 0);
        Status st = codec->Decode(Pointers(work).data(), erased, len);
        if (!st.ok() || work != Stripe(data, parity)) failures[t] = "decode failed in round " + std::to_string(round);
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(failures[t], "") << "thread " << t;
}

TEST(CodecTest, ZeroLengthIsANoOp) {
  auto codec = MakeCodec("rs:2", 3);
  const uint8_t* data[3] = {nullptr, nullptr, nullptr};
  uint8_t* parity[2] = {nullptr, nullptr};
  codec->Encode(data, parity, 0);
  uint8_t* segments[5] = {};
  EXPECT_TRUE(codec->Decode(segments, {0, 4}, 0).ok());
}

}  // namespace
}  // namespace memento
