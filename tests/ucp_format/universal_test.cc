// Tests of the universal checkpoint: native checkpoints written under several TP x DP x ZeRO layouts
// (fused QKV with GQA, padded vocab, uneven splits, replicated parameters, a scalar state) are
// converted and every consolidated tensor is compared bit for bit with a single-rank reference;
// loading onto other layouts (from the universal and from the native checkpoint) and back; the
// pattern spec for partial metadata (split, sub_params, vocab, replicated, average, dead rules);
// corrupted and truncated inputs; the safetensors files.
#include "ucp_format/universal.h"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/crc.h"
#include "core/dtype.h"
#include "core/shard.h"
#include "proto/shard_convert.h"
#include "ucp_format/native_checkpoint.h"
#include "ucp_format/pattern_spec.h"
#include "ucp_format/safetensors.h"

namespace memento {
namespace {

constexpr int64_t kStep = 7;
constexpr int64_t kVocab = 50;
constexpr int64_t kHidden = 8;
constexpr int64_t kFfn = 30;  // uneven over 4
const std::vector<int64_t> kQkvSubs = {16, 4, 4};  // GQA: 4 query heads, 1 key/value head of 4 rows

ShardSpec Must(Result<ShardSpec> r) {
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? std::move(r).value() : ShardSpec{};
}

std::string TestRoot() {
  const char* tmp = std::getenv("MEMENTO_TEST_TMP");
  std::string base = tmp != nullptr ? tmp : ::testing::TempDir();
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string root = base + "/" + info->test_suite_name() + "." + info->name();
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  return root;
}

// ---- the model and its single-rank reference ----------------------------------------------------

enum class Kind { kVocab, kQkv, kSplitCols, kSplitRows, kReplicated, kScalar };
struct Param {
  std::string name;
  Kind kind;
  std::vector<int64_t> shape;  // logical
};

const std::vector<Param>& Params() {
  static const std::vector<Param> kParams = {
      {"embed.w", Kind::kVocab, {kVocab, kHidden}},
      {"layers.0.attn.qkv.w", Kind::kQkv, {24, kHidden}},
      {"layers.0.mlp.w1", Kind::kSplitCols, {kHidden, kFfn}},
      {"layers.0.mlp.w2", Kind::kSplitRows, {kFfn, kHidden}},
      {"layers.0.ln.b", Kind::kReplicated, {kHidden}},
  };
  return kParams;
}
const std::vector<std::string> kStates = {"", ".exp_avg", ".exp_avg_sq"};

// Reference bytes of tensor `tensor` (logical shape): distinct float bit patterns per name and index.
std::vector<float> Reference(const std::string& tensor, int64_t numel) {
  std::mt19937 rng(static_cast<uint32_t>(Crc64(tensor.data(), tensor.size())));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(numel));
  for (float& x : v) x = u(rng);
  return v;
}

struct Layout {
  int tp = 1;
  int dp = 1;
  int zero = 0;
  int world() const { return tp * dp; }
};

// The TP shard of `p` on TP index `t` (replica id set later).
ShardSpec TpSpec(const Param& p, int tp, int t) {
  switch (p.kind) {
    case Kind::kVocab: return Must(VocabPaddedSplit(kVocab, kHidden, 4, tp, t));
    case Kind::kQkv: return Must(FusedSubParamSplit(p.shape, 0, kQkvSubs, tp, t));
    case Kind::kSplitCols: return Must(SplitEvenly(p.shape, 1, tp, t));
    case Kind::kSplitRows: return Must(SplitEvenly(p.shape, 0, tp, t));
    case Kind::kReplicated:
    case Kind::kScalar: return WholeTensor(p.shape);
  }
  return {};
}

// Elements [begin, begin + len) of the local buffer of `tp_spec` as box fragments of the global
// tensor, at local offsets from 0: a ZeRO partition of a TP shard.
ShardSpec LocalRange(const ShardSpec& tp_spec, int64_t begin, int64_t len) {
  ShardSpec out;
  out.global_shape = tp_spec.global_shape;
  out.original_shape = tp_spec.original_shape;
  int64_t local = 0;
  for (const Fragment& f : tp_spec.fragments) {
    const int64_t lo = std::max(begin, f.local_offset);
    const int64_t hi = std::min(begin + len, f.local_offset + f.numel());
    if (hi <= lo) continue;
    for (Box b : FlatRangeToBoxes(f.box.lengths, lo - f.local_offset, hi - lo)) {
      for (size_t d = 0; d < b.offsets.size(); ++d) b.offsets[d] += f.box.offsets[d];
      Fragment g;
      g.box = b;
      g.local_offset = local;
      local += b.numel();
      out.fragments.push_back(std::move(g));
    }
  }
  out.local_numel = len;
  return out;
}

struct TensorDef {
  std::string name;
  ShardSpec spec;
};

// Rank r's tensors under `l`: rank = dp_index * tp + tp_index. Values replicated over DP (replica id
// dp_index); with zero 1 the optimizer states are a flat partition of the rank's TP-local group
// (all parameters flattened in order, DeepSpeed-style); with zero 3 every state of every parameter
// is partitioned on its own, ceil(numel / dp) per rank.
std::vector<TensorDef> RankTensors(const Layout& l, int r) {
  const int t = r % l.tp, d = r / l.tp;
  std::vector<TensorDef> out;
  std::vector<ShardSpec> tp_specs;
  std::vector<std::vector<int64_t>> local_shapes;
  for (const Param& p : Params()) {
    tp_specs.push_back(TpSpec(p, l.tp, t));
    local_shapes.push_back({tp_specs.back().local_numel});
  }
  std::vector<FlatPartitionEntry> zero1;
  if (l.zero == 1) {
    auto z = ZeroFlatPartition(local_shapes, l.dp, d);
    EXPECT_TRUE(z.ok()) << z.status().ToString();
    zero1 = *z;
  }
  for (size_t i = 0; i < Params().size(); ++i) {
    const Param& p = Params()[i];
    const ShardSpec& tp_spec = tp_specs[i];
    for (const std::string& s : kStates) {
      ShardSpec spec;
      const bool state = !s.empty();
      if (l.zero == 3 || (l.zero == 1 && state)) {
        int64_t begin = 0, len = 0;
        if (l.zero == 3) {
          const int64_t n = tp_spec.local_numel, c = (n + l.dp - 1) / l.dp;
          begin = std::min(n, d * c);
          len = std::min(n, begin + c) - begin;
        } else {
          if (!zero1[i].spec.fragments.empty()) {
            begin = zero1[i].spec.fragments[0].flat_begin;
            len = zero1[i].spec.fragments[0].flat_length;
          }
        }
        spec = LocalRange(tp_spec, begin, len);
        // TP ranks partition their own copies of a replicated parameter: copies are replicas.
        if (p.kind == Kind::kReplicated) {
          for (Fragment& f : spec.fragments) f.replica_id = t;
        }
      } else {
        spec = tp_spec;
        // Copies of a box across DP (and, for replicated parameters, across TP) are replicas.
        const int replica = p.kind == Kind::kReplicated ? r : d;
        for (Fragment& f : spec.fragments) f.replica_id = replica;
      }
      out.push_back({p.name + s, spec});
    }
  }
  // A scalar optimizer state, replicated everywhere.
  out.push_back({"layers.0.ln.b.step", WholeTensor({}, r)});
  return out;
}

uint64_t Align(uint64_t n) { return (n + 4095) / 4096 * 4096; }

proto::RankRecord MakeRecord(int rank, int world, const std::vector<TensorDef>& tensors, uint64_t blob_capacity) {
  proto::RankRecord r;
  r.set_rank(rank);
  r.set_world_size(world);
  uint64_t offset = 0;
  for (const TensorDef& t : tensors) {
    proto::TensorRecord* tr = r.add_tensors();
    tr->set_name(t.name);
    tr->set_dtype(static_cast<int32_t>(DType::kF32));
    ToProto(t.spec, tr->mutable_spec());
    tr->set_slot_offset(offset);
    tr->set_bytes(static_cast<uint64_t>(t.spec.local_numel) * 4);
    offset += Align(std::max<uint64_t>(tr->bytes(), 1));
  }
  proto::BlobRecord* br = r.add_blobs();
  br->set_name("dataloader");
  br->set_capacity(blob_capacity);
  br->set_slot_offset(offset);
  offset += Align(8 + blob_capacity);
  r.set_slot_bytes(offset);
  return r;
}

std::vector<int64_t> LogicalShape(const std::string& tensor) {
  if (tensor == "layers.0.ln.b.step") return {};
  for (const Param& p : Params()) {
    for (const std::string& s : kStates) {
      if (p.name + s == tensor) return p.shape;
    }
  }
  ADD_FAILURE() << "no tensor " << tensor;
  return {};
}

// The local buffer a rank holds for `spec` of `tensor`: reference values, padding rows `pad`.
std::vector<float> LocalBuffer(const std::string& tensor, const ShardSpec& spec, float pad) {
  const std::vector<int64_t> logical = LogicalShape(tensor);
  const std::vector<float> ref = Reference(tensor, NumElements(logical));
  std::vector<float> out(static_cast<size_t>(spec.local_numel), 0.0f);
  const std::vector<int64_t>& g = spec.global_shape;
  for (const Fragment& f : spec.fragments) {
    std::vector<Box> boxes = f.kind == Fragment::Kind::kBox ? std::vector<Box>{f.box}
                                                            : FlatRangeToBoxes(g, f.flat_begin, f.flat_length);
    int64_t local = f.local_offset;
    for (const Box& b : boxes) {
      const int64_t n = b.numel();
      std::vector<int64_t> idx(g.size(), 0);
      for (int64_t e = 0; e < n; ++e) {
        bool padding = false;
        int64_t flat = 0;
        for (size_t d = 0; d < g.size(); ++d) {
          const int64_t at = b.offsets[d] + idx[d];
          if (d == 0 && !logical.empty() && at >= logical[0]) padding = true;
          flat = flat * (d < logical.size() ? logical[d] : 1) + at;
        }
        out[static_cast<size_t>(local + e)] = padding ? pad : ref[static_cast<size_t>(flat)];
        for (size_t d = g.size(); d-- > 0;) {
          if (++idx[d] < b.lengths[d]) break;
          idx[d] = 0;
        }
      }
      local += n;
    }
  }
  return out;
}

std::string BlobFor(int rank) { return "position of rank " + std::to_string(rank) + ": " + std::string(static_cast<size_t>(rank) * 3, 'x'); }

// One job's layout: records and slots of every rank, filled from the reference.
struct Job {
  Layout layout;
  std::vector<proto::RankRecord> records;
  std::vector<std::vector<uint8_t>> slots;
};

Job MakeJob(const Layout& l, float pad = 1e30f) {
  Job job;
  job.layout = l;
  for (int r = 0; r < l.world(); ++r) {
    const std::vector<TensorDef> tensors = RankTensors(l, r);
    job.records.push_back(MakeRecord(r, l.world(), tensors, 64));
    std::vector<uint8_t> slot(job.records.back().slot_bytes(), 0);
    for (int i = 0; i < job.records.back().tensors_size(); ++i) {
      const proto::TensorRecord& t = job.records.back().tensors(i);
      const std::vector<float> v = LocalBuffer(t.name(), tensors[static_cast<size_t>(i)].spec, pad);
      // An empty fragment's vector has no data(): memcpy from null is undefined even for 0 bytes.
      if (!v.empty()) std::memcpy(slot.data() + t.slot_offset(), v.data(), v.size() * 4);
    }
    const proto::BlobRecord& b = job.records.back().blobs(0);
    const std::string blob = BlobFor(r);
    const uint64_t n = blob.size();
    for (int i = 0; i < 8; ++i) slot[b.slot_offset() + static_cast<uint64_t>(i)] = static_cast<uint8_t>(n >> (8 * i));
    std::memcpy(slot.data() + b.slot_offset() + 8, blob.data(), blob.size());
    job.slots.push_back(std::move(slot));
  }
  return job;
}

Status WriteNative(FileSystem* fs, const std::string& dir, const Job& job, uint64_t crc_chunk = 256) {
  PersistOptions options;
  options.crc_chunk_bytes = crc_chunk;
  std::vector<proto::ManifestRank> entries;
  const int world = static_cast<int>(job.records.size());
  for (int r = 0; r < world; ++r) {
    RankImage image{r, world, &job.records[static_cast<size_t>(r)], job.slots[static_cast<size_t>(r)].data()};
    Result<proto::ManifestRank> e = WriteRankFiles(fs, dir, "job", kStep, image, options);
    if (!e.ok()) return e.status();
    entries.push_back(*e);
  }
  return CommitManifest(fs, dir, BuildManifest("job", kStep, world, entries));
}

std::vector<uint8_t> Bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * 4);
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

class UniversalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs_ = PosixFileSystem();
    root_ = TestRoot();
  }

  // Every state of every parameter of the universal checkpoint equals the reference, bit for bit.
  void ExpectMatchesReference(const std::string& ucp) {
    Result<proto::UniversalManifest> m = ReadUniversalManifest(fs_, ucp);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    ASSERT_EQ(m->params_size(), static_cast<int>(Params().size()));
    for (const Param& p : Params()) {
      for (const std::string& s : kStates) {
        const std::string state = s.empty() ? "fp32" : s.substr(1);
        Result<std::vector<uint8_t>> got = ReadUniversalTensor(fs_, ucp, *m, p.name, state);
        ASSERT_TRUE(got.ok()) << got.status().ToString();
        EXPECT_EQ(*got, Bytes(Reference(p.name + s, NumElements(p.shape)))) << p.name << s;
      }
    }
    Result<std::vector<uint8_t>> step = ReadUniversalTensor(fs_, ucp, *m, "layers.0.ln.b", "step");
    ASSERT_TRUE(step.ok()) << step.status().ToString();
    EXPECT_EQ(*step, Bytes(Reference("layers.0.ln.b.step", 1)));
  }

  // Loads every rank of `to` from `source` and checks each registered region and blob.
  void ExpectLoads(const std::string& source, const Layout& to) {
    const Job want = MakeJob(to, 0.0f);  // re-padded rows are zero
    for (int r = 0; r < to.world(); ++r) {
      const proto::RankRecord& rec = want.records[static_cast<size_t>(r)];
      std::vector<uint8_t> slot(rec.slot_bytes(), 0xEE);
      Status st = LoadRankResharded(fs_, source, rec, slot.data());
      ASSERT_TRUE(st.ok()) << "rank " << r << ": " << st.ToString();
      for (const proto::TensorRecord& t : rec.tensors()) {
        ASSERT_EQ(0, std::memcmp(slot.data() + t.slot_offset(), want.slots[static_cast<size_t>(r)].data() + t.slot_offset(),
                                 t.bytes()))
            << "rank " << r << " tensor " << t.name() << " tp " << to.tp << " dp " << to.dp << " zero " << to.zero;
      }
      const proto::BlobRecord& b = rec.blobs(0);
      EXPECT_EQ(0, std::memcmp(slot.data() + b.slot_offset(), want.slots[static_cast<size_t>(r)].data() + b.slot_offset(),
                               8 + b.capacity()))
          << "blob of rank " << r;
    }
  }

  // As ExpectLoads onto (tp 4, dp 1, zero 0) and (tp 1, dp 3, zero 1), tensors only.
  void ExpectLoadsTensorsOnly(const std::string& source) {
    for (const Layout& to : std::vector<Layout>{{4, 1, 0}, {1, 3, 1}}) {
      const Job want = MakeJob(to, 0.0f);
      for (int r = 0; r < to.world(); ++r) {
        proto::RankRecord rec = want.records[static_cast<size_t>(r)];
        rec.clear_blobs();
        std::vector<uint8_t> slot(rec.slot_bytes(), 0xEE);
        Status st = LoadRankResharded(fs_, source, rec, slot.data());
        ASSERT_TRUE(st.ok()) << "rank " << r << ": " << st.ToString();
        for (const proto::TensorRecord& t : rec.tensors()) {
          EXPECT_EQ(0, std::memcmp(slot.data() + t.slot_offset(),
                                   want.slots[static_cast<size_t>(r)].data() + t.slot_offset(), t.bytes()))
              << "rank " << r << " tensor " << t.name();
        }
      }
    }
  }

  ConvertSummary Convert(const std::string& native, const std::string& out, const PatternSpec* spec = nullptr) {
    ConvertOptions options;
    options.threads = 3;
    options.slab_bytes = 100;  // several slabs per tensor
    options.crc_chunk_bytes = 128;
    options.pattern = spec;
    Result<ConvertSummary> s = ConvertNativeToUniversal(fs_, native, out, options);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? *s : ConvertSummary{};
  }

  FileSystem* fs_ = nullptr;
  std::string root_;
};

TEST_F(UniversalTest, ConvertsTp2Dp2Zero1BitExact) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeJob({2, 2, 1})).ok());
  const ConvertSummary s = Convert(native, root_ + "/ucp");
  EXPECT_EQ(s.params, 5);
  EXPECT_EQ(s.tensors, 16);
  EXPECT_EQ(s.blobs, 4);
  EXPECT_EQ(s.step, kStep);
  EXPECT_EQ(s.source_world_size, 4);
  EXPECT_EQ(s.largest_tensor_bytes, uint64_t{kVocab * kHidden * 4});
  ExpectMatchesReference(root_ + "/ucp");
  Result<std::vector<std::string>> problems = VerifyUniversal(fs_, root_ + "/ucp");
  ASSERT_TRUE(problems.ok()) << problems.status().ToString();
  EXPECT_TRUE(problems->empty()) << (*problems)[0];
  // The temporary directory is gone; the files are where the format says.
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(root_)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"native", "ucp"}));
  EXPECT_TRUE(std::filesystem::exists(root_ + "/ucp/manifest.json"));
  EXPECT_TRUE(std::filesystem::exists(root_ + "/ucp/params/embed.w.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(root_ + "/ucp/blobs.safetensors"));
}

TEST_F(UniversalTest, ManifestRecordsShapesStatesSourceLayoutAndVocabPadding) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeJob({2, 2, 1})).ok());
  Convert(native, root_ + "/ucp");
  Result<proto::UniversalManifest> m = ReadUniversalManifest(fs_, root_ + "/ucp");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->source().kind(), "native");
  EXPECT_EQ(m->source().step(), kStep);
  EXPECT_EQ(m->source().world_size(), 4);
  const proto::UniversalParam* embed = nullptr;
  for (const proto::UniversalParam& p : m->params()) {
    if (p.name() == "embed.w") embed = &p;
  }
  ASSERT_NE(embed, nullptr);
  ASSERT_EQ(embed->states_size(), 3);
  EXPECT_EQ(embed->states(0).state(), "fp32");
  EXPECT_EQ(embed->states(1).state(), "exp_avg");
  EXPECT_EQ(embed->states(2).state(), "exp_avg_sq");
  EXPECT_EQ(embed->states(1).source_name(), "embed.w.exp_avg");
  EXPECT_EQ(std::vector<int64_t>(embed->states(0).shape().begin(), embed->states(0).shape().end()),
            (std::vector<int64_t>{kVocab, kHidden}));
  EXPECT_EQ(std::vector<int64_t>(embed->padded_shape().begin(), embed->padded_shape().end()),
            (std::vector<int64_t>{56, kHidden}));
  EXPECT_EQ(embed->states(0).dtype(), static_cast<int32_t>(DType::kF32));
  EXPECT_EQ(embed->rule_index(), -1);
  EXPECT_EQ(embed->consolidation(), "box-intersection");
  // Value pieces: replica 0 of TP index 0 and 1 (ranks 0 and 1).
  ASSERT_EQ(embed->source_shards_size(), 2);
  EXPECT_EQ(embed->source_shards(0).rank(), 0);
  EXPECT_EQ(embed->source_shards(1).rank(), 1);
  EXPECT_EQ(embed->source_layout(), "native metadata: 2 box and 0 flat pieces");
  // The CRC is that of the bytes.
  const std::vector<uint8_t> bytes = Bytes(Reference("embed.w", kVocab * kHidden));
  EXPECT_EQ(embed->states(0).crc64(), Crc64(bytes.data(), bytes.size()));
  // The JSON view parses back to the same content.
  std::ifstream json(root_ + "/ucp/manifest.json");
  std::string text((std::istreambuf_iterator<char>(json)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\"padded_shape\""), std::string::npos);
  EXPECT_NE(text.find("\"source_name\": \"embed.w.exp_avg\""), std::string::npos);
}

TEST_F(UniversalTest, SafetensorsFilesFollowTheFormat) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeJob({2, 2, 1})).ok());
  Convert(native, root_ + "/ucp");
  const std::string path = root_ + "/ucp/params/layers.0.attn.qkv.w.safetensors";
  // By hand: u64 header length, JSON, data tiles the rest.
  std::ifstream f(path, std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(all[static_cast<size_t>(i)]);
  const std::string header = all.substr(8, n);
  EXPECT_EQ((8 + n) % 4096, 0u);
  EXPECT_EQ(header.substr(0, 77),
            "{\"__metadata__\":{\"format\":\"memento-universal\",\"param\":\"layers.0.attn.qkv.w\"},");
  EXPECT_NE(header.find("\"fp32\":{\"dtype\":\"F32\",\"shape\":[24,8],\"data_offsets\":[0,768]}"), std::string::npos);
  EXPECT_NE(header.find("\"exp_avg\":{\"dtype\":\"F32\",\"shape\":[24,8],\"data_offsets\":[768,1536]}"),
            std::string::npos);
  EXPECT_EQ(all.size(), 8 + n + 3 * 768);
  EXPECT_EQ(all.substr(8 + n, 768), std::string(reinterpret_cast<const char*>(Bytes(Reference("layers.0.attn.qkv.w", 192)).data()), 768));
  // Through the reader.
  Result<std::unique_ptr<SafetensorsFile>> st = SafetensorsFile::Open(fs_, path);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ((*st)->metadata().at("param"), "layers.0.attn.qkv.w");
  Result<std::vector<uint8_t>> v = (*st)->Read("exp_avg_sq");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, Bytes(Reference("layers.0.attn.qkv.w.exp_avg_sq", 192)));
  // A pure-Python reader (what safe_open checks) agrees, when python3 is here.
  if (std::system("python3 -c 'import json,struct' >/dev/null 2>&1") == 0) {
    const std::string script = std::string(MEMENTO_SOURCE_DIR) + "/tests/ucp_format/read_safetensors.py";
    const std::string out = root_ + "/py.txt";
    ASSERT_EQ(std::system(("python3 " + script + " " + path + " > " + out).c_str()), 0);
    std::ifstream py(out);
    std::string text((std::istreambuf_iterator<char>(py)), std::istreambuf_iterator<char>());
    uint64_t sum = 0;
    for (uint8_t b : Bytes(Reference("layers.0.attn.qkv.w", 192))) sum += b;
    EXPECT_NE(text.find("fp32 F32 [24, 8] " + std::to_string(sum)), std::string::npos) << text;
  }
}

TEST_F(UniversalTest, ConvertsEveryLayoutBitExact) {
  const std::vector<Layout> layouts = {{1, 1, 0}, {4, 1, 0}, {1, 3, 1}, {2, 2, 3}, {1, 4, 3}, {2, 2, 0}};
  for (const Layout& l : layouts) {
    const std::string tag = std::to_string(l.tp) + "x" + std::to_string(l.dp) + "z" + std::to_string(l.zero);
    SCOPED_TRACE(tag);
    ASSERT_TRUE(WriteNative(fs_, root_ + "/native-" + tag, MakeJob(l)).ok());
    Convert(root_ + "/native-" + tag, root_ + "/ucp-" + tag);
    ExpectMatchesReference(root_ + "/ucp-" + tag);
  }
}

TEST_F(UniversalTest, LoadsOntoNewLayoutsFromUniversalAndNativeAndBack) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeJob({2, 2, 1})).ok());
  Convert(native, root_ + "/ucp");
  for (const Layout& to : std::vector<Layout>{{4, 1, 0}, {1, 3, 1}, {2, 2, 3}, {2, 2, 1}, {1, 1, 0}}) {
    SCOPED_TRACE("tp " + std::to_string(to.tp) + " dp " + std::to_string(to.dp) + " zero " + std::to_string(to.zero));
    ExpectLoads(root_ + "/ucp", to);
    ExpectLoads(native, to);
  }
  // And back: save what (tp2, dp2, zero3) loaded, convert again, load as (tp2, dp2, zero1).
  const Layout z3{2, 2, 3};
  Job loaded = MakeJob(z3, 0.0f);
  for (int r = 0; r < z3.world(); ++r) {
    std::fill(loaded.slots[static_cast<size_t>(r)].begin(), loaded.slots[static_cast<size_t>(r)].end(), 0);
    ASSERT_TRUE(LoadRankResharded(fs_, root_ + "/ucp", loaded.records[static_cast<size_t>(r)],
                                  loaded.slots[static_cast<size_t>(r)].data())
                    .ok());
  }
  ASSERT_TRUE(WriteNative(fs_, root_ + "/native-z3", loaded).ok());
  Convert(root_ + "/native-z3", root_ + "/ucp-z3");
  ExpectMatchesReference(root_ + "/ucp-z3");
  ExpectLoads(root_ + "/native-z3", {2, 2, 1});
}

TEST_F(UniversalTest, BlobsOfRanksTheSavedJobDidNotHaveCannotBeMapped) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeJob({2, 2, 1})).ok());
  Convert(native, root_ + "/ucp");
  const Job bigger = MakeJob({1, 5, 0});
  std::vector<uint8_t> slot(bigger.records[4].slot_bytes());
  for (const std::string& src : {root_ + "/ucp", native}) {
    Status st = LoadRankResharded(fs_, src, bigger.records[4], slot.data());
    EXPECT_EQ(st.code(), StatusCode::kNotFound);
    EXPECT_EQ(st.message(),
              "blob 'dataloader' of rank 4 cannot be mapped: per-rank blobs follow the rank-number rule (rank r's "
              "blob comes from saved rank r), and the checkpoint " + src + " holds blobs of 4 ranks, none of rank 4");
  }
}

TEST_F(UniversalTest, RefusesAnExistingOutputAndLeavesNothingOnError) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeJob({2, 1, 0})).ok());
  std::filesystem::create_directories(root_ + "/taken");
  Result<ConvertSummary> s = ConvertNativeToUniversal(fs_, native, root_ + "/taken");
  EXPECT_EQ(s.status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(s.status().message(), root_ + "/taken already exists; the universal checkpoint needs a new path");
  Result<ConvertSummary> none = ConvertNativeToUniversal(fs_, root_ + "/nothing", root_ + "/out");
  EXPECT_EQ(none.status().code(), StatusCode::kNotFound);
  EXPECT_FALSE(std::filesystem::exists(root_ + "/out"));
}

// ---- corrupted and truncated inputs ------------------------------------------------------------

void FlipByte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f.good()) << path;
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x40);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

// The persisted run of `tensor` in rank `rank`'s metadata.
proto::PersistedRun RunOf(FileSystem* fs, const std::string& dir, int rank, const std::string& tensor) {
  Result<proto::Manifest> m = ReadManifest(fs, dir);
  EXPECT_TRUE(m.ok());
  Result<proto::RankMetadata> meta = ReadRankMetadata(fs, dir, *m, rank);
  EXPECT_TRUE(meta.ok());
  for (const proto::PersistedTensor& t : meta->tensors()) {
    if (t.name() == tensor) return t.runs(0);
  }
  ADD_FAILURE() << "no run of " << tensor;
  return {};
}

TEST_F(UniversalTest, CorruptedNativeInputIsDataLossNamingFileTensorAndBytes) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeJob({2, 2, 1})).ok());
  const proto::PersistedRun run = RunOf(fs_, native, 1, "layers.0.mlp.w1");
  ASSERT_EQ(run.chunk_bytes(), 256u);
  FlipByte(native + "/rank-1.data", run.file_offset() + 300);
  Result<ConvertSummary> s = ConvertNativeToUniversal(fs_, native, root_ + "/ucp");
  ASSERT_EQ(s.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(s.status().message(), native + "/rank-1.data: tensor 'layers.0.mlp.w1' bytes 256..480: CRC mismatch");
  EXPECT_FALSE(std::filesystem::exists(root_ + "/ucp"));
  std::vector<std::string> left;
  for (const auto& e : std::filesystem::directory_iterator(root_)) left.push_back(e.path().filename().string());
  EXPECT_EQ(left, std::vector<std::string>{"native"});
  // Loading straight from the native checkpoint onto another layout sees the same fault.
  const Job tp1 = MakeJob({1, 1, 0});
  std::vector<uint8_t> slot(tp1.records[0].slot_bytes());
  Status st = LoadRankResharded(fs_, native, tp1.records[0], slot.data());
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_EQ(st.message(), native + "/rank-1.data: tensor 'layers.0.mlp.w1' bytes 256..480: CRC mismatch");
}

TEST_F(UniversalTest, TruncatedNativeInputIsDataLoss) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeJob({2, 2, 1})).ok());
  // Cut rank 3's data file inside the last tensor run.
  Result<proto::Manifest> m = ReadManifest(fs_, native);
  ASSERT_TRUE(m.ok());
  Result<proto::RankMetadata> meta = ReadRankMetadata(fs_, native, *m, 3);
  ASSERT_TRUE(meta.ok());
  // The scalar step of rank 3 is replica 3 (not written): the last tensor with a run.
  std::string name;
  proto::PersistedRun run;
  for (const proto::PersistedTensor& t : meta->tensors()) {
    if (t.runs_size() > 0) {
      name = t.name();
      run = t.runs(0);
    }
  }
  std::filesystem::resize_file(native + "/rank-3.data", run.file_offset() + 4);
  Result<ConvertSummary> s = ConvertNativeToUniversal(fs_, native, root_ + "/ucp");
  ASSERT_EQ(s.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(s.status().message(), native + "/rank-3.data: tensor '" + name + "' bytes 4.." +
                                      std::to_string(run.bytes()) + ": truncated");
  EXPECT_FALSE(std::filesystem::exists(root_ + "/ucp"));
}

TEST_F(UniversalTest, CorruptedOrTruncatedUniversalFilesAreReported) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeJob({2, 2, 1})).ok());
  Convert(native, root_ + "/ucp");
  Result<proto::UniversalManifest> m = ReadUniversalManifest(fs_, root_ + "/ucp");
  ASSERT_TRUE(m.ok());
  const std::string w2 = root_ + "/ucp/params/layers.0.mlp.w2.safetensors";
  uint64_t offset = 0;
  for (const proto::UniversalParam& p : m->params()) {
    if (p.name() == "layers.0.mlp.w2") offset = p.states(1).data_offset();  // exp_avg
  }
  FlipByte(w2, offset + 130);
  Result<std::vector<std::string>> problems = VerifyUniversal(fs_, root_ + "/ucp");
  ASSERT_TRUE(problems.ok());
  EXPECT_EQ(*problems, std::vector<std::string>{w2 + ": tensor 'exp_avg' bytes 0..960: CRC mismatch"});
  // Loading checks the 128-byte chunk it reads.
  const Job tp4 = MakeJob({4, 1, 0});
  std::vector<uint8_t> slot(tp4.records[0].slot_bytes());
  Status st = LoadRankResharded(fs_, root_ + "/ucp", tp4.records[0], slot.data());
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_EQ(st.message(), w2 + ": tensor 'layers.0.mlp.w2.exp_avg' bytes 128..256: CRC mismatch");

  const std::string embed = root_ + "/ucp/params/embed.w.safetensors";
  std::filesystem::resize_file(embed, std::filesystem::file_size(embed) - 10);
  Result<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(fs_, embed);
  EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(f.status().message(), embed + ": the header describes 8896 bytes, the file has 8886 (truncated)");
  std::filesystem::remove(root_ + "/ucp/manifest.pb");
  Result<proto::UniversalManifest> gone = ReadUniversalManifest(fs_, root_ + "/ucp");
  EXPECT_EQ(gone.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(gone.status().message(), root_ + "/ucp is not a universal checkpoint: it has no manifest.pb");
}

// Found with tests/fuzz/fuzz_universal_manifest.cc: a tensor's data_offset + bytes wrapped around
// 64 bits past the file-size check, and ReadUniversalTensor then allocated 2^64 - 5 bytes
// (std::length_error: the process ended); a shape's element count could overflow likewise.
TEST_F(UniversalTest, ManifestSizesThatWrapAroundAreRefused) {
  const std::string dir = root_ + "/wrap";
  ASSERT_TRUE(fs_->CreateDirs(dir).ok());
  proto::UniversalManifest m;
  m.set_format_version(kUniversalFormatVersion);
  proto::UniversalTensor* t = m.add_params()->add_states();
  t->set_source_name("w");
  t->set_dtype(static_cast<int32_t>(DType::kF32));
  t->set_file("params/w.safetensors");
  t->set_data_offset(10);
  t->set_bytes(~uint64_t{0} - 4);
  ASSERT_TRUE(WriteFileAtomically(fs_, dir + "/manifest.pb", m.SerializeAsString()).ok());
  EXPECT_EQ(ReadUniversalManifest(fs_, dir).status().ToString(),
            "DataLoss: " + dir + "/manifest.pb: tensor 'w': 18446744073709551611 bytes at 10 end past 2^64");
  t->set_bytes(4);
  t->add_shape(int64_t{1} << 62);
  ASSERT_TRUE(WriteFileAtomically(fs_, dir + "/manifest.pb", m.SerializeAsString()).ok());
  EXPECT_EQ(ReadUniversalManifest(fs_, dir).status().ToString(),
            "DataLoss: " + dir + "/manifest.pb: tensor 'w': shape [4611686018427387904] has a negative dim or more "
            "elements than 64 bits can count");
}

TEST_F(UniversalTest, MalformedSafetensorsHeadersAreRefused) {
  auto write = [&](const std::string& name, const std::string& json, size_t data) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>((json.size() >> (8 * i)) & 0xFF);
    s += json + std::string(data, '\0');
    std::ofstream(root_ + "/" + name, std::ios::binary) << s;
    return root_ + "/" + name;
  };
  std::string p = write("hole", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
  EXPECT_EQ(SafetensorsFile::Open(fs_, p).status().message(),
            p + ": tensor 'a' starts at 4, expected 0 (a hole or an overlap in the data buffer)");
  p = write("size", R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
  EXPECT_EQ(SafetensorsFile::Open(fs_, p).status().message(),
            p + ": tensor 'a': data_offsets span 8 bytes, [3] of F32 needs 12");
  p = write("dtype", R"({"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}})", 1);
  EXPECT_EQ(SafetensorsFile::Open(fs_, p).status().message(), p + ": tensor 'a': unknown dtype 'Q7'");
  p = write("json", R"({"a":{"dtype":"F32",)", 0);
  EXPECT_EQ(SafetensorsFile::Open(fs_, p).status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(SafetensorsFile::Open(fs_, p).status().message(), p + ": malformed header JSON at byte 20: expected a string");
  // Found with tests/fuzz/fuzz_safetensors.cc (UBSan): the element count was an int64 product that overflowed
  // (undefined), and [2^32,2^32] of F32 wrapped around to 0 bytes, so the header was accepted.
  p = write("overflow", R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0);
  EXPECT_EQ(SafetensorsFile::Open(fs_, p).status().message(),
            p + ": tensor 'a': shape [4294967296,4294967296] has more elements than int64 can count");
  p = write("bytes", R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0);
  EXPECT_EQ(SafetensorsFile::Open(fs_, p).status().message(),
            p + ": tensor 'a': shape [4611686018427387904] of F64 has more bytes than 64 bits can count");
  // Keys become Protobuf strings (UTF-8 only): other bytes, raw or as a lone surrogate, are refused.
  p = write("latin1", "{\"w\xff\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0);
  EXPECT_EQ(SafetensorsFile::Open(fs_, p).status().message(), p + ": malformed header JSON at byte 5: a string that is not UTF-8");
  p = write("surrogate", R"({"\ud800":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})", 0);
  EXPECT_EQ(SafetensorsFile::Open(fs_, p).status().message(), p + ": malformed header JSON at byte 9: a string that is not UTF-8");
  proto::UniversalManifest m;
  m.set_format_version(kUniversalFormatVersion);
  m.add_params()->set_name("w\xff");
  EXPECT_EQ(SerializeUniversalManifest(m).status().ToString(),
            "InvalidArgument: parameter name 'w\xFF' is not UTF-8: a universal manifest (Protobuf strings) cannot hold it");
}

// ---- partial metadata and the pattern spec -------------------------------------------------------

// A job that saves per-rank local tensors as whole tensors of their local shapes (no global layout),
// as foreign trainers do: (tp 2, dp 2) with vocab, fused QKV, a column split, a replicated and an
// averaged parameter.
Job MakeLocalJob() {
  const Layout l{2, 2, 0};
  Job job;
  job.layout = l;
  for (int r = 0; r < l.world(); ++r) {
    const int t = r % l.tp;
    std::vector<TensorDef> defs;
    std::vector<std::vector<float>> values;
    for (const Param& p : Params()) {
      const ShardSpec tp_spec = TpSpec(p, l.tp, t);
      std::vector<int64_t> local;
      if (p.kind == Kind::kVocab || p.kind == Kind::kQkv || p.kind == Kind::kSplitRows) {
        local = {tp_spec.local_numel / kHidden, kHidden};
      } else if (p.kind == Kind::kSplitCols) {
        local = {kHidden, tp_spec.local_numel / kHidden};
      } else {
        local = p.shape;
      }
      for (const std::string& s : kStates) {
        defs.push_back({p.name + s, WholeTensor(local)});
        values.push_back(LocalBuffer(p.name + s, tp_spec, 0.0f));
      }
    }
    defs.push_back({"layers.0.ln.b.step", WholeTensor({})});
    values.push_back(Reference("layers.0.ln.b.step", 1));
    // "avg.b": each TP rank holds its own copy; the universal value is their mean.
    defs.push_back({"avg.b", WholeTensor({4})});
    std::vector<float> avg = Reference("avg.b.tp" + std::to_string(t), 4);
    values.push_back(avg);
    job.records.push_back(MakeRecord(r, l.world(), defs, 64));
    std::vector<uint8_t> slot(job.records.back().slot_bytes(), 0);
    for (int i = 0; i < job.records.back().tensors_size(); ++i) {
      const proto::TensorRecord& tr = job.records.back().tensors(i);
      std::memcpy(slot.data() + tr.slot_offset(), values[static_cast<size_t>(i)].data(), tr.bytes());
    }
    const proto::BlobRecord& b = job.records.back().blobs(0);
    for (int i = 0; i < 8; ++i) slot[b.slot_offset() + static_cast<uint64_t>(i)] = 0;
    job.slots.push_back(std::move(slot));
  }
  return job;
}

constexpr const char* kLocalSpec = R"(
  source { tp: 2 dp: 2 }
  rule { pattern: "embed\\.w" vocab { original_size: 50 } }
  rule { pattern: ".*\\.qkv\\.w" sub_params { dim: 0 sizes: [16, 4, 4] } }
  rule { pattern: ".*mlp\\.w1" split { dim: 1 } }
  rule { pattern: ".*mlp\\.w2" split { dim: 0 } }
  rule { pattern: ".*ln\\.b" replicated {} }
  rule { pattern: "avg\\.b" average {} }
)";

TEST_F(UniversalTest, PatternSpecRebuildsPartialMetadataBitExact) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeLocalJob()).ok());
  Result<PatternSpec> spec = PatternSpec::Parse(kLocalSpec);
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  Convert(native, root_ + "/ucp", &*spec);
  Result<proto::UniversalManifest> m = ReadUniversalManifest(fs_, root_ + "/ucp");
  ASSERT_TRUE(m.ok());
  for (const Param& p : Params()) {
    for (const std::string& s : kStates) {
      Result<std::vector<uint8_t>> got = ReadUniversalTensor(fs_, root_ + "/ucp", *m, p.name, s.empty() ? "fp32" : s.substr(1));
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      EXPECT_EQ(*got, Bytes(Reference(p.name + s, NumElements(p.shape)))) << p.name << s;
    }
  }
  const std::vector<float> a = Reference("avg.b.tp0", 4), b = Reference("avg.b.tp1", 4);
  std::vector<float> mean(4);
  for (size_t i = 0; i < 4; ++i) mean[i] = (0.0f + a[i] + b[i]) / 2.0f;
  Result<std::vector<uint8_t>> got = ReadUniversalTensor(fs_, root_ + "/ucp", *m, "avg.b", "fp32");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, Bytes(mean));
  for (const proto::UniversalParam& p : m->params()) {
    if (p.name() == "layers.0.attn.qkv.w") {
      EXPECT_EQ(p.rule_index(), 1);
      EXPECT_EQ(p.rule_pattern(), ".*\\.qkv\\.w");
      EXPECT_EQ(p.source_layout(), "sub_params [16,4,4] dim 0 over tp 2");
    }
    if (p.name() == "avg.b") {
      EXPECT_EQ(p.consolidation(), "average");
    }
  }
  EXPECT_EQ(m->source().pattern_spec().rule_size(), 6);
  // The rebuilt universal checkpoint loads onto a real sharded layout.
  ExpectLoadsTensorsOnly(root_ + "/ucp");
}

TEST_F(UniversalTest, PartialMetadataWithoutARuleIsAClearError) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeLocalJob()).ok());
  Result<ConvertSummary> s = ConvertNativeToUniversal(fs_, native, root_ + "/ucp");
  EXPECT_EQ(s.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.status().message(),
            "tensor 'avg.b': ranks 0, 1, 2, 3 saved 16 elements of replica 0 for a tensor of 4 [4]: its layout "
            "metadata is partial: add a pattern spec rule for it");
}

TEST_F(UniversalTest, DeadPatternRuleIsAnErrorInStrictMode) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeLocalJob()).ok());
  Result<PatternSpec> dead = PatternSpec::Parse(std::string(kLocalSpec) + R"(rule { pattern: "decoder\\..*" split { dim: 0 } })");
  ASSERT_TRUE(dead.ok());
  ConvertOptions options;
  options.pattern = &*dead;
  Result<ConvertSummary> s = ConvertNativeToUniversal(fs_, native, root_ + "/ucp", options);
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.status().message(),
            "pattern spec rule 6 ('decoder\\..*', split dim 0) matches no parameter of " + native +
                " (strict: a rule that applies to nothing is an error; set allow_unmatched_rules: true to allow it)");
  EXPECT_FALSE(std::filesystem::exists(root_ + "/ucp"));
  // A rule shadowed by an earlier one is dead too, and says which rule took its names.
  Result<PatternSpec> shadowed =
      PatternSpec::Parse(std::string(kLocalSpec) + R"(rule { pattern: "layers\\.0\\.mlp\\.w1" replicated {} })");
  ASSERT_TRUE(shadowed.ok());
  options.pattern = &*shadowed;
  s = ConvertNativeToUniversal(fs_, native, root_ + "/ucp", options);
  EXPECT_EQ(s.status().message(),
            "pattern spec rule 6 ('layers\\.0\\.mlp\\.w1', replicated) every parameter it matches (e.g. "
            "'layers.0.mlp.w1') is taken by rule 2 first (strict: a rule that applies to nothing is an error; set "
            "allow_unmatched_rules: true to allow it)");
  // Not strict: converts.
  Result<PatternSpec> lenient = PatternSpec::Parse(std::string(kLocalSpec) +
                                                   R"(rule { pattern: "decoder\\..*" split { dim: 0 } } allow_unmatched_rules: true)");
  ASSERT_TRUE(lenient.ok());
  Convert(native, root_ + "/ucp", &*lenient);
}

TEST_F(UniversalTest, PatternSpecSyntaxAndRuleErrors) {
  Result<PatternSpec> bad = PatternSpec::Parse("rule { pattern: \"(\" split { dim: 0 } }");
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message().substr(0, 41), "pattern spec rule 0 ('('): bad regex '(':");
  // Found by tests/fuzz/fuzz_pattern_spec.cc (UBSan): libstdc++ reads \N and {n,m} into a long
  // without checking; a longer number overflowed inside std::regex.
  Result<PatternSpec> number = PatternSpec::Parse(R"(rule { pattern: "a{2222222222222222222}" split { dim: 0 } })");
  EXPECT_EQ(number.status().ToString(),
            "InvalidArgument: pattern spec rule 0 ('a{2222222222222222222}'): bad regex 'a{2222222222222222222}': a number of "
            "more than 9 digits");
  EXPECT_FALSE(RegexNumbersFit("(a)\\12345678901"));
  EXPECT_TRUE(RegexNumbersFit("layer\\.[0-9]+\\.w{1,3}x123456789012"));  // a literal number is fine
  Result<PatternSpec> syntax = PatternSpec::Parse("rule { patern: \"x\" }");
  EXPECT_EQ(syntax.status().message().substr(0, 37), "pattern spec: line 1 column 14: Messa");
  Result<PatternSpec> empty = PatternSpec::Parse("rule { pattern: \"x\" }");
  EXPECT_EQ(empty.status().message(),
            "pattern spec rule 0 ('x'): says nothing (give replicated, average, split, sub_params, vocab or "
            "pipeline_replicated)");
  Result<PatternSpec> dim1 = PatternSpec::Parse("rule { pattern: \"x\" sub_params { dim: 1 sizes: 4 } }");
  EXPECT_EQ(dim1.status().message(),
            "pattern spec rule 0 ('x'): sub_params along dim 1 is not supported (sub-tensors must be stacked along "
            "dim 0)");
  Result<PatternSpec> naming = PatternSpec::Parse("states { regex: \"^(.+)_(m|v)$\" value_state: \"param\" }");
  ASSERT_TRUE(naming.ok());
  std::string param, state;
  naming->SplitName("w_m", &param, &state);
  EXPECT_EQ(param + "|" + state, "w|m");
  naming->SplitName("w.exp_avg", &param, &state);
  EXPECT_EQ(param + "|" + state, "w.exp_avg|param");
}

TEST_F(UniversalTest, WrongSourceDegreesAreAClearError) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeLocalJob()).ok());
  Result<PatternSpec> spec = PatternSpec::Parse(std::string(kLocalSpec).replace(std::string(kLocalSpec).find("tp: 2"), 5, "tp: 4"));
  ASSERT_TRUE(spec.ok());
  ConvertOptions options;
  options.pattern = &*spec;
  Result<ConvertSummary> s = ConvertNativeToUniversal(fs_, native, root_ + "/ucp", options);
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.status().message(),
            "tensor 'avg.b' (pattern spec rule 5 'avg\\.b', average): the pattern spec's source degrees tp 4 x dp 2 "
            "x pp 1 do not make the checkpoint's world size 4");
}

TEST_F(UniversalTest, MissingShardIsACoverageError) {
  // Rank 3 does not save its part of layers.0.mlp.w2.exp_avg (ZeRO-1: all of TP index 1's rows).
  Job job = MakeJob({2, 2, 1});
  proto::RankRecord& r3 = job.records[3];
  for (int i = 0; i < r3.tensors_size(); ++i) {
    if (r3.tensors(i).name() == "layers.0.mlp.w2.exp_avg") r3.mutable_tensors()->DeleteSubrange(i, 1);
  }
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, job).ok());
  Result<ConvertSummary> s = ConvertNativeToUniversal(fs_, native, root_ + "/ucp");
  EXPECT_EQ(s.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.status().message(),
            "tensor 'layers.0.mlp.w2.exp_avg': the checkpoint covers 120 of 240 elements of rows 0..30 (a rank's "
            "shard is missing)");
  EXPECT_FALSE(std::filesystem::exists(root_ + "/ucp"));
}

// Two pipeline stages (tp 1, dp 1, pp 2) both hold the tied embedding as a whole local tensor.
TEST_F(UniversalTest, PipelineReplicatedParameterNeedsItsRule) {
  const std::string native = root_ + "/native";
  Job job;
  for (int r = 0; r < 2; ++r) {
    std::vector<TensorDef> defs = {{"embed.w", WholeTensor({kVocab, kHidden})},
                                   {"layers." + std::to_string(r) + ".b", WholeTensor({4})}};
    job.records.push_back(MakeRecord(r, 2, defs, 16));
    std::vector<uint8_t> slot(job.records.back().slot_bytes(), 0);
    const std::vector<float> e = Reference("embed.w", kVocab * kHidden);
    std::memcpy(slot.data() + job.records.back().tensors(0).slot_offset(), e.data(), e.size() * 4);
    const std::vector<float> b = Reference("layers." + std::to_string(r) + ".b", 4);
    std::memcpy(slot.data() + job.records.back().tensors(1).slot_offset(), b.data(), b.size() * 4);
    job.slots.push_back(std::move(slot));
  }
  ASSERT_TRUE(WriteNative(fs_, native, job).ok());
  Result<ConvertSummary> s = ConvertNativeToUniversal(fs_, native, root_ + "/ucp");
  EXPECT_EQ(s.status().message(),
            "tensor 'embed.w': ranks 0, 1 saved 800 elements of replica 0 for a tensor of 400 [50,8]: its layout "
            "metadata is partial: add a pattern spec rule for it");
  Result<PatternSpec> replicated =
      PatternSpec::Parse("source { pp: 2 } rule { pattern: \"embed\\\\.w\" replicated {} }");
  ASSERT_TRUE(replicated.ok()) << replicated.status().ToString();
  ConvertOptions options;
  options.pattern = &*replicated;
  s = ConvertNativeToUniversal(fs_, native, root_ + "/ucp", options);
  EXPECT_EQ(s.status().message(),
            "tensor 'embed.w' (pattern spec rule 0 'embed\\.w', replicated): pipeline stages 0 and 1 both hold it; "
            "mark the rule pipeline_replicated");
  Result<PatternSpec> tied = PatternSpec::Parse(
      "source { pp: 2 } rule { pattern: \"embed\\\\.w\" replicated {} pipeline_replicated: true }");
  ASSERT_TRUE(tied.ok());
  ConvertSummary summary = Convert(native, root_ + "/ucp", &*tied);
  EXPECT_EQ(summary.params, 3);
  Result<proto::UniversalManifest> m = ReadUniversalManifest(fs_, root_ + "/ucp");
  ASSERT_TRUE(m.ok());
  Result<std::vector<uint8_t>> got = ReadUniversalTensor(fs_, root_ + "/ucp", *m, "embed.w", "fp32");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, Bytes(Reference("embed.w", kVocab * kHidden)));
  got = ReadUniversalTensor(fs_, root_ + "/ucp", *m, "layers.1.b", "fp32");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, Bytes(Reference("layers.1.b", 4)));
}

// ---- the CLI ---------------------------------------------------------------------------------

struct CliOutput {
  int exit_code = -1;
  std::string out, err;
};

CliOutput RunCli(const std::string& root, const std::string& args) {
  const std::string err_path = root + "/.stderr";
  const std::string cmd = std::string(MEMENTO_BIN_DIR) + "/memento " + args + " 2>" + err_path;
  CliOutput o;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return o;
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) o.out.append(buf, n);
  const int status = ::pclose(p);
  o.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream e(err_path);
  o.err.assign(std::istreambuf_iterator<char>(e), std::istreambuf_iterator<char>());
  return o;
}

TEST_F(UniversalTest, CliConvertsWithJsonSummaryAndPatternSpec) {
  const std::string native = root_ + "/native";
  ASSERT_TRUE(WriteNative(fs_, native, MakeJob({2, 2, 1})).ok());
  CliOutput o = RunCli(root_, "convert --json --threads 2 " + native + " --to ucp " + root_ + "/ucp");
  ASSERT_EQ(o.exit_code, 0) << o.err;
  EXPECT_EQ(o.err, "");
  const std::string head = "{\"source\":\"" + native + "\",\"out\":\"" + root_ +
                           "/ucp\",\"format\":\"ucp\",\"step\":7,\"source_world_size\":4,\"params\":5,\"tensors\":16,"
                           "\"blobs\":4,\"tensor_bytes\":";
  EXPECT_EQ(o.out.substr(0, head.size()), head);
  EXPECT_NE(o.out.find("\"largest_tensor_bytes\":1600,\"threads\":2,\"seconds\":"), std::string::npos) << o.out;
  ExpectMatchesReference(root_ + "/ucp");
  // Text output; an existing output path; a dead rule in a pattern file; usage errors.
  o = RunCli(root_, "convert " + native + " --to ucp " + root_ + "/ucp2");
  EXPECT_EQ(o.exit_code, 0) << o.err;
  EXPECT_EQ(o.out.substr(0, o.out.find(':')), "converted " + native + " (step 7, 4 ranks) to " + root_ + "/ucp2");
  o = RunCli(root_, "convert " + native + " --to ucp " + root_ + "/ucp");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.err, "memento convert: " + root_ + "/ucp already exists; the universal checkpoint needs a new path\n");
  std::ofstream(root_ + "/spec.textproto") << "rule { pattern: \"nothing\" replicated {} }\n";
  o = RunCli(root_, "convert --json --pattern " + root_ + "/spec.textproto " + native + " --to ucp " + root_ + "/ucp3");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.out, "{\"error\":\"pattern spec rule 0 ('nothing', replicated) matches no parameter of " + native +
                       " (strict: a rule that applies to nothing is an error; set allow_unmatched_rules: true to allow "
                       "it)\",\"code\":\"InvalidArgument\"}\n");
  EXPECT_FALSE(std::filesystem::exists(root_ + "/ucp3"));
  o = RunCli(root_, "verify " + root_ + "/ucp");
  EXPECT_EQ(o.exit_code, 0) << o.err;
  EXPECT_EQ(o.out, "OK: universal checkpoint " + root_ + "/ucp intact\n");
  const std::string w1 = root_ + "/ucp/params/layers.0.mlp.w1.safetensors";
  FlipByte(w1, 4096 + 5);  // in "fp32"
  o = RunCli(root_, "verify --json " + root_ + "/ucp");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.out, "{\"dir\":\"" + root_ + "/ucp\",\"format\":\"ucp\",\"ok\":false,\"problems\":[\"" + w1 +
                       ": tensor 'fp32' bytes 0..960: CRC mismatch\"]}\n");
  o = RunCli(root_, "convert " + native + " --to deepspeed " + root_ + "/x");
  EXPECT_EQ(o.exit_code, 2);
  EXPECT_EQ(o.err.substr(0, o.err.find('\n')), "memento convert: unknown target format 'deepspeed' (supported: ucp, deepspeed-universal, safetensors)");
}

}  // namespace
}  // namespace memento
