// Tests of the native persisted checkpoint: write two ranks (a TP split, a DP-replicated tensor,
// ZeRO flat partitions, a blob), commit, list, verify, restore exactly, restore into other layouts
// through the resharding engine, and the failures: flipped bytes, truncation, no manifest, EIO.
#include "ucp_format/native_checkpoint.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/crc.h"
#include "core/dtype.h"
#include "core/shard.h"
#include "proto/shard_convert.h"

namespace memento {
namespace {

constexpr int kWorld = 2;
constexpr int64_t kStep = 100;
const std::vector<int64_t> kW = {64, 33};
const std::vector<int64_t> kLn = {2048};
const std::vector<std::vector<int64_t>> kZero = {{10, 7}, {5}};

ShardSpec Must(Result<ShardSpec> r) {
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? std::move(r).value() : ShardSpec{};
}

struct TensorDef {
  std::string name;
  DType dtype;
  ShardSpec spec;
};
struct BlobDef {
  std::string name;
  uint64_t capacity;
};

uint64_t Align(uint64_t n) { return (n + 4095) / 4096 * 4096; }

proto::RankRecord MakeLayout(int rank, int world, const std::vector<TensorDef>& tensors,
                             const std::vector<BlobDef>& blobs) {
  proto::RankRecord r;
  r.set_rank(rank);
  r.set_world_size(world);
  uint64_t offset = 0;
  for (const TensorDef& t : tensors) {
    proto::TensorRecord* tr = r.add_tensors();
    tr->set_name(t.name);
    tr->set_dtype(static_cast<int32_t>(t.dtype));
    ToProto(t.spec, tr->mutable_spec());
    tr->set_slot_offset(offset);
    tr->set_bytes(static_cast<uint64_t>(t.spec.local_numel) * DTypeSize(t.dtype));
    offset += Align(std::max<uint64_t>(tr->bytes(), 1));
  }
  for (const BlobDef& b : blobs) {
    proto::BlobRecord* br = r.add_blobs();
    br->set_name(b.name);
    br->set_capacity(b.capacity);
    br->set_slot_offset(offset);
    offset += Align(8 + b.capacity);
  }
  r.set_slot_bytes(offset);
  return r;
}

// The layout of rank `r` of the 2-rank job: w split along dim 0, ln replicated (rank r holds
// replica r), z.a and z.b ZeRO-partitioned, blob rng.
proto::RankRecord JobLayout(int r) {
  auto zero = ZeroFlatPartition(kZero, kWorld, r);
  EXPECT_TRUE(zero.ok());
  return MakeLayout(r, kWorld,
                    {{"w", DType::kF32, Must(SplitEvenly(kW, 0, kWorld, r))},
                     {"ln", DType::kF32, WholeTensor(kLn, r)},
                     {"z.a", DType::kF16, (*zero)[0].spec},
                     {"z.b", DType::kF16, (*zero)[1].spec}},
                    {{"rng", 100}});
}

const proto::TensorRecord& Tensor(const proto::RankRecord& layout, const std::string& name) {
  for (const proto::TensorRecord& t : layout.tensors()) {
    if (t.name() == name) return t;
  }
  ADD_FAILURE() << "no tensor " << name;
  return layout.tensors(0);
}

// The bytes of tensor `name` in a slot laid out as `layout`.
std::vector<uint8_t> Region(const proto::RankRecord& layout, const std::vector<uint8_t>& slot, const std::string& name) {
  const proto::TensorRecord& t = Tensor(layout, name);
  return std::vector<uint8_t>(slot.begin() + static_cast<std::ptrdiff_t>(t.slot_offset()),
                              slot.begin() + static_cast<std::ptrdiff_t>(t.slot_offset() + t.bytes()));
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

std::vector<std::string> Strings(const std::vector<VerifyProblem>& problems) {
  std::vector<std::string> out;
  for (const VerifyProblem& p : problems) out.push_back(p.ToString());
  return out;
}

class NativeCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs_ = PosixFileSystem();
    root_ = TestRoot();
    dir_ = CheckpointDir(root_, "job", kStep);
    options_.crc_chunk_bytes = 1024;
    std::mt19937_64 rng(42);
    for (int r = 0; r < kWorld; ++r) {
      layouts_[r] = JobLayout(r);
      slots_[r].assign(layouts_[r].slot_bytes(), 0);
      for (const proto::TensorRecord& t : layouts_[r].tensors()) {
        for (uint64_t i = 0; i < t.bytes(); ++i) slots_[r][t.slot_offset() + i] = static_cast<uint8_t>(rng());
      }
      const proto::BlobRecord& b = layouts_[r].blobs(0);
      const uint64_t length = 20 + 7 * static_cast<uint64_t>(r);
      for (int i = 0; i < 8; ++i) slots_[r][b.slot_offset() + i] = static_cast<uint8_t>(length >> (8 * i));
      for (uint64_t i = 0; i < length; ++i) slots_[r][b.slot_offset() + 8 + i] = static_cast<uint8_t>(rng());
    }
    // Data-parallel replicas hold the same bytes.
    const proto::TensorRecord& ln0 = Tensor(layouts_[0], "ln");
    const proto::TensorRecord& ln1 = Tensor(layouts_[1], "ln");
    std::memcpy(&slots_[1][ln1.slot_offset()], &slots_[0][ln0.slot_offset()], ln0.bytes());
    ASSERT_TRUE(WriteCheckpoint(dir_, kStep, kWorld).ok());
  }

  // Writes ranks 0..ranks-1 of the job into `dir` and commits it.
  Status WriteCheckpoint(const std::string& dir, int64_t step, int ranks, bool commit = true) {
    std::vector<proto::ManifestRank> entries;
    for (int r = 0; r < ranks; ++r) {
      RankImage image{r, ranks, &layouts_[r], slots_[r].data()};
      Result<proto::ManifestRank> e = WriteRankFiles(fs_, dir, "job", step, image, options_);
      if (!e.ok()) return e.status();
      entries.push_back(*e);
    }
    if (!commit) return Status::Ok();
    return CommitManifest(fs_, dir, BuildManifest("job", step, ranks, entries));
  }

  proto::Manifest Manifest() {
    Result<proto::Manifest> m = ReadManifest(fs_, dir_);
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    return m.ok() ? *m : proto::Manifest{};
  }

  FileSystem* fs_ = nullptr;
  std::string root_, dir_;
  PersistOptions options_;
  proto::RankRecord layouts_[kWorld];
  std::vector<uint8_t> slots_[kWorld];
};

TEST_F(NativeCheckpointTest, PathsAreTheDocumentedOnes) {
  EXPECT_EQ(JobDir("/ckpt", "llama"), "/ckpt/llama");
  EXPECT_EQ(CheckpointDir("/ckpt", "llama", 1200), "/ckpt/llama/step-1200");
  EXPECT_EQ(CheckpointDir("/ckpt/", "llama", 0), "/ckpt/llama/step-0");
  EXPECT_EQ(DataFileName(3), "rank-3.data");
  EXPECT_EQ(MetaFileName(3), "rank-3.meta");
}

TEST_F(NativeCheckpointTest, ListsVerifiesAndRestoresEveryRankExactly) {
  Result<std::vector<CheckpointInfo>> list = ListCheckpoints(fs_, JobDir(root_, "job"));
  ASSERT_TRUE(list.ok()) << list.status().ToString();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].step, kStep);
  EXPECT_EQ((*list)[0].dir, dir_);
  EXPECT_TRUE((*list)[0].committed);
  EXPECT_EQ((*list)[0].bytes, 20500u + 16411u);
  EXPECT_EQ((*list)[0].ranks, 2);
  EXPECT_EQ((*list)[0].uncommitted_reason, "");

  const proto::Manifest m = Manifest();
  EXPECT_EQ(m.format_version(), kNativeFormatVersion);
  EXPECT_EQ(m.job_id(), "job");
  EXPECT_EQ(m.step(), kStep);
  EXPECT_EQ(m.world_size(), 2);
  ASSERT_EQ(m.ranks_size(), 2);
  EXPECT_EQ(m.ranks(1).data_file(), "rank-1.data");
  EXPECT_EQ(m.ranks(1).meta_file(), "rank-1.meta");
  EXPECT_EQ(m.total_bytes(), 20500u + 16411u);

  VerifyStats stats;
  uint64_t last_done = 0, last_total = 0;
  Result<std::vector<VerifyProblem>> problems =
      VerifyCheckpoint(fs_, dir_, &stats, [&](uint64_t done, uint64_t total) {
        last_done = done;
        last_total = total;
      });
  ASSERT_TRUE(problems.ok()) << problems.status().ToString();
  EXPECT_EQ(Strings(*problems), std::vector<std::string>{});
  EXPECT_EQ(stats.tensors, 4);
  EXPECT_EQ(stats.blobs, 2);
  // w 2 x 4224, ln 8192 once, z.a 76 + 64, z.b 10, blobs 20 + 27.
  EXPECT_EQ(stats.bytes, 2u * 4224 + 8192 + 76 + 64 + 10 + 20 + 27);
  EXPECT_EQ(last_done, stats.bytes);
  EXPECT_EQ(last_total, stats.bytes);

  for (int r = 0; r < kWorld; ++r) {
    std::vector<uint8_t> slot(layouts_[r].slot_bytes(), 0);
    Status st = LoadRank(fs_, dir_, m, layouts_[r], slot.data());
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_TRUE(slot == slots_[r]) << "rank " << r;
  }
}

TEST_F(NativeCheckpointTest, OnlyReplicaZeroIsWritten) {
  const proto::Manifest m = Manifest();
  Result<proto::RankMetadata> meta0 = ReadRankMetadata(fs_, dir_, m, 0);
  Result<proto::RankMetadata> meta1 = ReadRankMetadata(fs_, dir_, m, 1);
  ASSERT_TRUE(meta0.ok() && meta1.ok());
  ASSERT_EQ(meta1->tensors_size(), 4);
  EXPECT_EQ(meta1->tensors(1).name(), "ln");
  EXPECT_EQ(meta1->tensors(1).runs_size(), 0);        // rank 1 holds replica 1 only
  EXPECT_EQ(meta1->tensors(1).spec().fragments(0).replica_id(), 1);
  EXPECT_EQ(meta0->tensors(1).runs_size(), 1);
  EXPECT_EQ(meta0->tensors(3).runs_size(), 0);        // rank 0 holds none of z.b
  // rank 0: w [0,4224) ln [8192,16384) z.a [16384,16460) rng [20480,20500)
  // rank 1: w [0,4224) z.a [8192,8256) z.b [12288,12298) rng [16384,16411)
  EXPECT_EQ(meta0->tensors(1).runs(0).file_offset(), 8192u);
  EXPECT_EQ(meta0->blobs(0).run().file_offset(), 20480u);
  EXPECT_EQ(meta1->tensors(3).runs(0).file_offset(), 12288u);
  EXPECT_EQ(meta0->tensors(0).runs(0).chunk_crcs_size(), 5);  // 4224 bytes in chunks of 1024
  EXPECT_EQ(meta0->tensors(0).runs(0).chunk_crcs(0), Crc64(&slots_[0][0], 1024));
  EXPECT_EQ(*fs_->FileSize(dir_ + "/rank-0.data"), 20500u);
  EXPECT_EQ(*fs_->FileSize(dir_ + "/rank-1.data"), 16411u);
  EXPECT_EQ(m.ranks(1).data_bytes(), 16411u);
}

TEST_F(NativeCheckpointTest, FlippedByteIsNamedByVerifyAndRefusedByLoad) {
  // Byte 2148 of rank 1's w run: chunk 2, bytes 2048..3072.
  FlipByte(dir_ + "/rank-1.data", 2148);
  const std::string expected = dir_ + "/rank-1.data: tensor 'w' bytes 2048..3072: CRC mismatch";
  Result<std::vector<VerifyProblem>> problems = VerifyCheckpoint(fs_, dir_);
  ASSERT_TRUE(problems.ok());
  EXPECT_EQ(Strings(*problems), std::vector<std::string>{expected});
  EXPECT_EQ((*problems)[0].file, dir_ + "/rank-1.data");
  EXPECT_EQ((*problems)[0].tensor, "w");
  EXPECT_EQ((*problems)[0].begin, 2048u);
  EXPECT_EQ((*problems)[0].end, 3072u);
  EXPECT_EQ((*problems)[0].what, "CRC mismatch");

  const proto::Manifest m = Manifest();
  std::vector<uint8_t> slot(layouts_[1].slot_bytes(), 0);
  Status st = LoadRank(fs_, dir_, m, layouts_[1], slot.data());
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_EQ(st.message(), expected);
  // Rank 0 reads nothing of rank 1's w.
  std::vector<uint8_t> slot0(layouts_[0].slot_bytes(), 0);
  EXPECT_TRUE(LoadRank(fs_, dir_, m, layouts_[0], slot0.data()).ok());
  EXPECT_TRUE(slot0 == slots_[0]);
}

// The agent's capture CRCs (per tensor region and chunk) stand in for the writer's own: the files
// are the same, and a byte that changed in memory since the capture fails verification.
TEST_F(NativeCheckpointTest, CaptureCrcsOfWholeTensorRunsAreReused) {
  auto region_crcs = [&](int r, uint64_t chunk) {
    std::vector<proto::RegionCrc> out;
    for (const proto::TensorRecord& t : layouts_[r].tensors()) {
      proto::RegionCrc c;
      c.set_name(t.name());
      c.set_offset(t.slot_offset());
      c.set_bytes(t.bytes());
      c.set_chunk_bytes(chunk);
      for (uint64_t at = 0; at < t.bytes(); at += chunk) {
        c.add_chunk_crcs(Crc64(slots_[r].data() + t.slot_offset() + at, std::min(chunk, t.bytes() - at)));
      }
      out.push_back(c);
    }
    return out;
  };
  auto write = [&](const std::string& dir, const std::vector<proto::RegionCrc>& crcs) {
    Result<proto::ManifestRank> e0 =
        WriteRankFiles(fs_, dir, "job", kStep, RankImage{0, kWorld, &layouts_[0], slots_[0].data()}, options_);
    RankImage image{1, kWorld, &layouts_[1], slots_[1].data()};
    image.region_crcs = &crcs;
    Result<proto::ManifestRank> e1 = WriteRankFiles(fs_, dir, "job", kStep, image, options_);
    ASSERT_TRUE(e0.ok() && e1.ok()) << e0.status().ToString() << " " << e1.status().ToString();
    ASSERT_TRUE(CommitManifest(fs_, dir, BuildManifest("job", kStep, kWorld, {*e0, *e1})).ok());
  };
  auto read = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  const std::vector<proto::RegionCrc> captured = region_crcs(1, options_.crc_chunk_bytes);
  const std::string same = root_ + "/reused";
  write(same, captured);
  EXPECT_EQ(read(same + "/rank-1.meta"), read(dir_ + "/rank-1.meta"));
  EXPECT_EQ(read(same + "/rank-1.data"), read(dir_ + "/rank-1.data"));

  // w changes in memory after its capture (byte 2148: chunk 2); the file carries the capture's CRCs.
  const uint64_t w = Tensor(layouts_[1], "w").slot_offset();
  slots_[1][w + 2148] ^= 0x40;
  const std::string changed = root_ + "/changed";
  write(changed, captured);
  Result<std::vector<VerifyProblem>> problems = VerifyCheckpoint(fs_, changed);
  ASSERT_TRUE(problems.ok()) << problems.status().ToString();
  EXPECT_EQ(Strings(*problems),
            std::vector<std::string>{changed + "/rank-1.data: tensor 'w' bytes 2048..3072: CRC mismatch"});

  // CRCs of another chunk size are not this file's: the writer computes its own (of the bytes now).
  const std::string other = root_ + "/other-chunks";
  std::vector<proto::RegionCrc> wrong = region_crcs(1, 2048);
  for (proto::RegionCrc& c : wrong) {
    for (int i = 0; i < c.chunk_crcs_size(); ++i) c.set_chunk_crcs(i, 0);
  }
  write(other, wrong);
  problems = VerifyCheckpoint(fs_, other);
  ASSERT_TRUE(problems.ok()) << problems.status().ToString();
  EXPECT_TRUE(problems->empty()) << Strings(*problems)[0];
}

TEST_F(NativeCheckpointTest, FlippedBlobByteAndMetadataByte) {
  FlipByte(dir_ + "/rank-0.data", 20480 + 3);
  FlipByte(dir_ + "/rank-1.meta", 10);
  Result<std::vector<VerifyProblem>> problems = VerifyCheckpoint(fs_, dir_);
  ASSERT_TRUE(problems.ok());
  EXPECT_EQ(Strings(*problems), (std::vector<std::string>{dir_ + "/rank-1.meta: metadata CRC mismatch",
                                                          dir_ + "/rank-0.data: blob 'rng' bytes 0..20: CRC mismatch"}));
  const proto::Manifest m = Manifest();
  Result<proto::RankMetadata> meta = ReadRankMetadata(fs_, dir_, m, 1);
  EXPECT_EQ(meta.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(meta.status().message(), dir_ + "/rank-1.meta: metadata CRC mismatch");
}

TEST_F(NativeCheckpointTest, TruncatedDataFile) {
  std::filesystem::resize_file(dir_ + "/rank-0.data", 10000);  // inside ln's run [8192,16384)
  Result<std::vector<VerifyProblem>> problems = VerifyCheckpoint(fs_, dir_);
  ASSERT_TRUE(problems.ok());
  const std::string f = dir_ + "/rank-0.data: ";
  EXPECT_EQ(Strings(*problems), (std::vector<std::string>{f + "tensor 'ln' bytes 1808..8192: truncated",
                                                          f + "tensor 'z.a' bytes 0..76: truncated",
                                                          f + "blob 'rng' bytes 0..20: truncated"}));
  std::vector<uint8_t> slot(layouts_[1].slot_bytes(), 0);
  Status st = LoadRank(fs_, dir_, Manifest(), layouts_[1], slot.data());  // needs ln from rank 0
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_EQ(st.message(), f + "tensor 'ln' bytes 1808..8192: truncated");
}

TEST_F(NativeCheckpointTest, MissingFiles) {
  std::filesystem::remove(dir_ + "/rank-1.data");
  std::filesystem::remove(dir_ + "/rank-0.meta");
  Result<std::vector<VerifyProblem>> problems = VerifyCheckpoint(fs_, dir_);
  ASSERT_TRUE(problems.ok());
  EXPECT_EQ(Strings(*problems), (std::vector<std::string>{dir_ + "/rank-0.meta: missing file",
                                                          dir_ + "/rank-1.data: missing file"}));
}

TEST_F(NativeCheckpointTest, DirectoryWithoutManifestIsNotACheckpoint) {
  const std::string partial = CheckpointDir(root_, "job", 200);
  ASSERT_TRUE(WriteCheckpoint(partial, 200, kWorld, /*commit=*/false).ok());
  ASSERT_TRUE(WriteCheckpoint(CheckpointDir(root_, "job", 7), 7, kWorld).ok());
  std::filesystem::create_directories(JobDir(root_, "job") + "/step-x");   // not a step
  std::filesystem::create_directories(JobDir(root_, "job") + "/step-007"); // not a name we write

  const std::string message = partial + " has no manifest: not a committed checkpoint";
  Result<proto::Manifest> m = ReadManifest(fs_, partial);
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(m.status().message(), message);
  Result<std::vector<VerifyProblem>> v = VerifyCheckpoint(fs_, partial);
  EXPECT_EQ(v.status().code(), StatusCode::kNotFound);

  Result<std::vector<CheckpointInfo>> list = ListCheckpoints(fs_, JobDir(root_, "job"));
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 3u);
  EXPECT_EQ((*list)[0].step, 7);
  EXPECT_EQ((*list)[1].step, 100);
  EXPECT_EQ((*list)[2].step, 200);
  EXPECT_TRUE((*list)[0].committed);
  EXPECT_FALSE((*list)[2].committed);
  EXPECT_EQ((*list)[2].bytes, 20500u + 16411u);
  EXPECT_EQ((*list)[2].ranks, 2);
  EXPECT_EQ((*list)[2].uncommitted_reason, message);

  Result<std::vector<CheckpointInfo>> none = ListCheckpoints(fs_, JobDir(root_, "nojob"));
  EXPECT_EQ(none.status().code(), StatusCode::kNotFound);
}

TEST_F(NativeCheckpointTest, MalformedAndForeignManifests) {
  ASSERT_TRUE(WriteFileAtomically(fs_, dir_ + "/manifest", "not a manifest").ok());
  Result<proto::Manifest> m = ReadManifest(fs_, dir_);
  EXPECT_EQ(m.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(m.status().message(), dir_ + "/manifest: malformed manifest (not a Manifest record)");

  proto::Manifest future = BuildManifest("job", kStep, 0, {});
  future.set_format_version(7);
  ASSERT_TRUE(CommitManifest(fs_, dir_, future).ok());
  m = ReadManifest(fs_, dir_);
  EXPECT_EQ(m.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(m.status().message(), dir_ + "/manifest: format version 7, this build reads version 1");
}

// Found with tests/fuzz/fuzz_native_meta.cc: a fragment's bytes (elements x width) wrapped around
// 64 bits, so a run of 0 bytes (and chunk size 0) passed for a fragment of 2^62 F32 elements, and
// restoring a registered shard of that tensor from it divided by the chunk size.
TEST_F(NativeCheckpointTest, FragmentOfMoreBytesThan64BitsCountIsRefused) {
  proto::RankMetadata meta;
  meta.set_format_version(kNativeFormatVersion);
  meta.set_step(kStep);
  meta.set_world_size(1);
  meta.set_data_file("rank-0.data");
  proto::PersistedTensor* t = meta.add_tensors();
  t->set_name("w");
  t->set_dtype(static_cast<int32_t>(DType::kF32));
  ShardSpec spec;
  spec.global_shape = {int64_t{1} << 62};
  spec.local_numel = int64_t{1} << 62;
  Fragment f;
  f.kind = Fragment::Kind::kFlat;
  f.flat_length = int64_t{1} << 62;
  spec.fragments.push_back(f);
  ASSERT_TRUE(spec.Validate().ok());
  ToProto(spec, t->mutable_spec());
  t->add_runs()->set_fragment(0);
  const std::string bytes = meta.SerializeAsString();
  std::ofstream(dir_ + "/big.meta", std::ios::binary) << bytes;
  proto::ManifestRank entry;
  entry.set_meta_file("big.meta");
  entry.set_data_file("rank-0.data");
  entry.set_meta_crc(Crc64(bytes.data(), bytes.size()));
  Result<proto::RankMetadata> read = ReadRankMetadata(fs_, dir_, BuildManifest("job", kStep, 1, {entry}), 0);
  EXPECT_EQ(read.status().ToString(), "DataLoss: " + dir_ + "/big.meta: tensor 'w': fragment 0 of 4611686018427387904 "
                                      "elements of 4 bytes is larger than 64 bits can count");
}

TEST_F(NativeCheckpointTest, RestoresIntoOneRankHoldingEverything) {
  const proto::RankRecord whole = MakeLayout(0, 1,
                                             {{"w", DType::kF32, WholeTensor(kW)},
                                              {"ln", DType::kF32, WholeTensor(kLn)},
                                              {"z.a", DType::kF16, WholeTensor(kZero[0])},
                                              {"z.b", DType::kF16, WholeTensor(kZero[1])}},
                                             {{"rng", 50}});
  std::vector<uint8_t> slot(whole.slot_bytes(), 0xee);
  Status st = LoadRank(fs_, dir_, Manifest(), whole, slot.data());
  ASSERT_TRUE(st.ok()) << st.ToString();

  auto concat = [&](const std::string& name) {
    std::vector<uint8_t> a = Region(layouts_[0], slots_[0], name);
    std::vector<uint8_t> b = Region(layouts_[1], slots_[1], name);
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  EXPECT_TRUE(Region(whole, slot, "w") == concat("w"));
  EXPECT_TRUE(Region(whole, slot, "ln") == Region(layouts_[0], slots_[0], "ln"));
  EXPECT_TRUE(Region(whole, slot, "z.a") == concat("z.a"));
  EXPECT_TRUE(Region(whole, slot, "z.b") == Region(layouts_[1], slots_[1], "z.b"));
  // The blob of rank 0, zero-filled past its length.
  const uint64_t off = whole.blobs(0).slot_offset();
  std::vector<uint8_t> expected_blob(8 + 50, 0);
  std::memcpy(expected_blob.data(), &slots_[0][layouts_[0].blobs(0).slot_offset()], 8 + 20);
  EXPECT_TRUE(std::vector<uint8_t>(slot.begin() + static_cast<std::ptrdiff_t>(off),
                                   slot.begin() + static_cast<std::ptrdiff_t>(off + 58)) == expected_blob);
}

TEST_F(NativeCheckpointTest, RestoresIntoThreeColumnParallelRanks) {
  // The saved w, row-major [64,33]: rows 0..31 from rank 0, 32..63 from rank 1.
  std::vector<uint8_t> global = Region(layouts_[0], slots_[0], "w");
  std::vector<uint8_t> tail = Region(layouts_[1], slots_[1], "w");
  global.insert(global.end(), tail.begin(), tail.end());
  for (int k = 0; k < 3; ++k) {
    const proto::RankRecord layout = MakeLayout(k, 3, {{"w", DType::kF32, Must(SplitEvenly(kW, 1, 3, k))}}, {});
    std::vector<uint8_t> slot(layout.slot_bytes(), 0);
    Status st = LoadRank(fs_, dir_, Manifest(), layout, slot.data());
    ASSERT_TRUE(st.ok()) << st.ToString();
    std::vector<uint8_t> expected;
    for (int64_t i = 0; i < 64; ++i) {
      const auto* row = &global[static_cast<size_t>((i * 33 + 11 * k) * 4)];
      expected.insert(expected.end(), row, row + 11 * 4);
    }
    EXPECT_TRUE(Region(layout, slot, "w") == expected) << "rank " << k;
  }
}

TEST_F(NativeCheckpointTest, LoadRefusesWhatTheCheckpointCannotServe) {
  const proto::Manifest m = Manifest();
  auto load = [&](const proto::RankRecord& layout) {
    std::vector<uint8_t> slot(layout.slot_bytes(), 0);
    return LoadRank(fs_, dir_, m, layout, slot.data());
  };
  Status st = load(MakeLayout(0, 1, {{"w", DType::kF16, WholeTensor(kW)}}, {}));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(st.message(), "tensor 'w': the checkpoint holds F32 (" + dir_ + "/rank-0.data), rank 0 registered F16");

  st = load(MakeLayout(0, 1, {{"w", DType::kF32, WholeTensor({64, 34})}}, {}));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(st.message(), "tensor 'w': the checkpoint's global shape [64,33] (" + dir_ +
                              "/rank-0.data) differs from rank 0's [64,34]");

  st = load(MakeLayout(0, 1, {{"bias", DType::kF32, WholeTensor({4})}}, {}));
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_EQ(st.message(), "tensor 'bias' of rank 0 is not in the checkpoint " + dir_);

  st = load(MakeLayout(1, 2, {}, {{"state", 10}}));
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_EQ(st.message(), "blob 'state' of rank 1 is not in the checkpoint " + dir_);

  st = load(MakeLayout(1, 2, {}, {{"rng", 26}}));  // rank 1 saved 27 bytes
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(st.message(), "blob 'rng': the checkpoint holds 27 bytes, rank 1 registered a capacity of 26");

  st = load(MakeLayout(2, 3, {}, {{"rng", 100}}));
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_EQ(st.message(), "blob 'rng' of rank 2: the checkpoint " + dir_ + " has no rank 2 (world size 2)");

  // A checkpoint of rank 0 alone holds half of w.
  const std::string half = CheckpointDir(root_, "job", 300);
  ASSERT_TRUE(WriteCheckpoint(half, 300, 1).ok());
  Result<proto::Manifest> hm = ReadManifest(fs_, half);
  ASSERT_TRUE(hm.ok());
  const proto::RankRecord layout = MakeLayout(0, 1, {{"w", DType::kF32, WholeTensor(kW)}}, {});
  std::vector<uint8_t> slot(layout.slot_bytes(), 0);
  st = LoadRank(fs_, half, *hm, layout, slot.data());
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(st.message(), "tensor 'w': the checkpoint covers 1056 of 2112 elements of rank 0's shard");
}

TEST_F(NativeCheckpointTest, BlobLongerThanItsCapacityIsNotWritten) {
  const proto::BlobRecord& b = layouts_[0].blobs(0);
  slots_[0][b.slot_offset()] = 200;
  RankImage image{0, 1, &layouts_[0], slots_[0].data()};
  Result<proto::ManifestRank> e = WriteRankFiles(fs_, root_ + "/bad", "job", 1, image, options_);
  EXPECT_EQ(e.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(e.status().message(), "rank 0 blob 'rng': saved length 200 exceeds its capacity 100");
}

TEST_F(NativeCheckpointTest, ReadErrorsNameThePath) {
  FaultInjectionFileSystem faulty(PosixFileSystem());
  faulty.FailReadsOf("rank-1.data");
  const std::string path = dir_ + "/rank-1.data";
  std::vector<uint8_t> slot(layouts_[1].slot_bytes(), 0);
  Status st = LoadRank(&faulty, dir_, Manifest(), layouts_[1], slot.data());
  EXPECT_EQ(st.code(), StatusCode::kIOError);
  EXPECT_NE(st.message().find(path), std::string::npos) << st.ToString();
  EXPECT_EQ(st.message(), "read(" + path + "): Input/output error");

  Result<std::vector<VerifyProblem>> v = VerifyCheckpoint(&faulty, dir_);
  EXPECT_EQ(v.status().code(), StatusCode::kIOError);
  EXPECT_NE(v.status().message().find(path), std::string::npos);
  EXPECT_GT(faulty.injected_faults(), 0u);
}

// A slot at a 4 KiB-aligned address with runs longer than a write piece (16 MiB), CRC chunks that
// straddle the pieces, runs at aligned and unaligned slot addresses and of odd lengths: the data
// file holds exactly the runs, each at the next 4 KiB boundary after zero padding, whether the file
// writes them from the slot or copies them (short writes split every Append).
TEST_F(NativeCheckpointTest, LargeRunsFromAnAlignedSlotAreWrittenByteForByte) {
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  const proto::RankRecord layout =
      MakeLayout(0, 1,
                 {{"big", DType::kU8, WholeTensor({static_cast<int64_t>(40 * kMiB + 123)})},
                  // Three runs; the second and third start at odd slot addresses (rows of 4000 bytes).
                  {"qkv", DType::kF32, Must(FusedSubParamSplit({1100, 1000}, 0, {300, 500, 300}, 1, 0))},
                  {"even", DType::kF16, WholeTensor({static_cast<int64_t>(kMiB)})}},
                 {{"rng", 3000}});
  const size_t slot_bytes = static_cast<size_t>(layout.slot_bytes());
  std::unique_ptr<uint8_t, decltype(&std::free)> slot(static_cast<uint8_t*>(std::aligned_alloc(4096, slot_bytes)),
                                                      &std::free);
  ASSERT_NE(slot, nullptr);
  std::mt19937_64 rng(7);
  for (size_t i = 0; i < slot_bytes; i += 8) {
    const uint64_t v = rng();
    std::memcpy(slot.get() + i, &v, std::min<size_t>(8, slot_bytes - i));
  }
  const proto::BlobRecord& blob = layout.blobs(0);
  const uint64_t blob_length = 2999;
  for (int i = 0; i < 8; ++i) slot.get()[blob.slot_offset() + i] = static_cast<uint8_t>(blob_length >> (8 * i));

  // The data file as docs/formats/native-checkpoint.md describes it, and each run's slot bytes.
  std::string expected;
  std::vector<std::pair<const uint8_t*, uint64_t>> runs;
  auto add_run = [&](const uint8_t* p, uint64_t n) {
    expected.resize((expected.size() + 4095) / 4096 * 4096, '\0');
    expected.append(reinterpret_cast<const char*>(p), n);
    runs.emplace_back(p, n);
  };
  for (const proto::TensorRecord& t : layout.tensors()) {
    const ShardSpec spec = Must(FromProto(t.spec()));
    const uint64_t width = DTypeSize(static_cast<DType>(t.dtype()));
    for (const Fragment& f : spec.fragments) {
      add_run(slot.get() + t.slot_offset() + static_cast<uint64_t>(f.local_offset) * width,
              static_cast<uint64_t>(f.numel()) * width);
    }
  }
  add_run(slot.get() + blob.slot_offset() + 8, blob_length);
  ASSERT_EQ(runs.size(), 6u);

  PersistOptions options;
  options.crc_chunk_bytes = 5 * kMiB + 3;
  auto faulty = FaultInjectionFileSystem::FromSpec(fs_, "short_writes=1");
  ASSERT_TRUE(faulty.ok());
  for (FileSystem* fs : {fs_, static_cast<FileSystem*>(faulty->get())}) {
    SCOPED_TRACE(fs == fs_ ? "posix" : "short writes");
    const std::string dir = CheckpointDir(root_, fs == fs_ ? "aligned" : "split", 1);
    RankImage image{0, 1, &layout, slot.get()};
    Result<proto::ManifestRank> entry = WriteRankFiles(fs, dir, "job", 1, image, options);
    ASSERT_TRUE(entry.ok()) << entry.status().ToString();
    EXPECT_EQ(entry->data_bytes(), expected.size());
    Result<std::string> data = ReadFileToString(fs_, dir + "/rank-0.data");
    ASSERT_TRUE(data.ok());
    ASSERT_EQ(data->size(), expected.size());
    const auto first_difference = std::mismatch(data->begin(), data->end(), expected.begin()).first;
    EXPECT_TRUE(first_difference == data->end()) << "first difference at byte " << (first_difference - data->begin());

    ASSERT_TRUE(CommitManifest(fs_, dir, BuildManifest("job", 1, 1, {*entry})).ok());
    Result<proto::Manifest> m = ReadManifest(fs_, dir);
    ASSERT_TRUE(m.ok());
    Result<proto::RankMetadata> meta = ReadRankMetadata(fs_, dir, *m, 0);
    ASSERT_TRUE(meta.ok()) << meta.status().ToString();
    std::vector<const proto::PersistedRun*> persisted;
    for (const proto::PersistedTensor& t : meta->tensors()) {
      for (const proto::PersistedRun& r : t.runs()) persisted.push_back(&r);
    }
    persisted.push_back(&meta->blobs(0).run());
    ASSERT_EQ(persisted.size(), runs.size());
    for (size_t i = 0; i < runs.size(); ++i) {
      const auto [p, n] = runs[i];
      const proto::PersistedRun& r = *persisted[i];
      EXPECT_EQ(r.bytes(), n) << "run " << i;
      EXPECT_EQ(r.chunk_bytes(), options.crc_chunk_bytes);
      ASSERT_EQ(static_cast<uint64_t>(r.chunk_crcs_size()), (n + r.chunk_bytes() - 1) / r.chunk_bytes()) << "run " << i;
      for (int c = 0; c < r.chunk_crcs_size(); ++c) {
        const uint64_t begin = static_cast<uint64_t>(c) * r.chunk_bytes();
        EXPECT_EQ(r.chunk_crcs(c), Crc64(p + begin, std::min(r.chunk_bytes(), n - begin)))
            << "run " << i << " chunk " << c;
      }
    }
    Result<std::vector<VerifyProblem>> problems = VerifyCheckpoint(fs_, dir);
    ASSERT_TRUE(problems.ok()) << problems.status().ToString();
    EXPECT_EQ(Strings(*problems), std::vector<std::string>{});
    std::vector<uint8_t> restored(slot_bytes, 0);
    Status st = LoadRank(fs_, dir, *m, layout, restored.data());
    ASSERT_TRUE(st.ok()) << st.ToString();
    for (const proto::TensorRecord& t : layout.tensors()) {
      EXPECT_EQ(std::memcmp(restored.data() + t.slot_offset(), slot.get() + t.slot_offset(), t.bytes()), 0) << t.name();
    }
  }
  EXPECT_GT((*faulty)->injected_faults(), 0u);
}

TEST_F(NativeCheckpointTest, BandwidthCapSlowsTheWrite) {
  PersistOptions slow = options_;
  slow.bandwidth_bytes_per_s = 200000;  // 20500 bytes: at least ~0.1 s
  RankImage image{0, 2, &layouts_[0], slots_[0].data()};
  const auto start = std::chrono::steady_clock::now();
  Result<proto::ManifestRank> e = WriteRankFiles(fs_, root_ + "/slow", "job", 1, image, slow);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_EQ(e->data_bytes(), 20500u);
  EXPECT_GE(seconds, 0.1);
}

}  // namespace
}  // namespace memento
