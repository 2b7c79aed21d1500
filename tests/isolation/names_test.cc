// Tensor, blob and checkpoint names never become paths outside the checkpoint root (issue #8):
// a native checkpoint whose tensors are named like paths converts to a universal checkpoint whose
// files all lie inside it, and a universal manifest that names a file outside is refused on read.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/shard.h"
#include "proto/shard_convert.h"
#include "ucp_format/native_checkpoint.h"
#include "ucp_format/universal.h"

namespace memento {
namespace {

std::string TestRoot() {
  const char* tmp = std::getenv("MEMENTO_TEST_TMP");
  std::string base = tmp != nullptr ? tmp : ::testing::TempDir();
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string root = base + "/" + info->test_suite_name() + "." + info->name();
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  return root;
}

// Every regular file under `dir`, relative to it, sorted.
std::vector<std::string> FilesUnder(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) out.push_back(std::filesystem::relative(e.path(), dir).string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

class NamesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs_ = PosixFileSystem();
    root_ = TestRoot();
  }
  // A one-rank native checkpoint in <root>/ckpt/native with F32 tensors of 4 elements named
  // `names`, and a blob named `blob`.
  std::string WriteNative(const std::vector<std::string>& names, const std::string& blob) {
    proto::RankRecord r;
    r.set_rank(0);
    r.set_world_size(1);
    uint64_t offset = 0;
    for (const std::string& n : names) {
      proto::TensorRecord* t = r.add_tensors();
      t->set_name(n);
      t->set_dtype(static_cast<int32_t>(DType::kF32));
      ToProto(WholeTensor({4}), t->mutable_spec());
      t->set_slot_offset(offset);
      t->set_bytes(16);
      offset += 4096;
    }
    proto::BlobRecord* b = r.add_blobs();
    b->set_name(blob);
    b->set_capacity(16);
    b->set_slot_offset(offset);
    offset += 4096;
    r.set_slot_bytes(offset);
    std::vector<uint8_t> slot(offset, 0);
    for (size_t i = 0; i < names.size(); ++i) {
      const float v[4] = {1.0f + static_cast<float>(i), 2.0f, 3.0f, 4.0f};
      std::memcpy(slot.data() + i * 4096, v, sizeof v);
    }
    slot[offset - 4096] = 3;  // blob length 3
    std::memcpy(slot.data() + offset - 4096 + 8, "abc", 3);
    const std::string dir = root_ + "/ckpt/native";
    RankImage image{0, 1, &r, slot.data()};
    Result<proto::ManifestRank> e = WriteRankFiles(fs_, dir, "job", 5, image, PersistOptions{});
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    if (e.ok()) {
      EXPECT_TRUE(CommitManifest(fs_, dir, BuildManifest("job", 5, 1, {*e})).ok());
    }
    return dir;
  }

  FileSystem* fs_ = nullptr;
  std::string root_;
};

TEST_F(NamesTest, PathLikeTensorAndBlobNamesStayInsideTheCheckpoint) {
  const std::string native = WriteNative({"../../escape", "/abs/x", "a/../../b"}, "../blob");
  // The native format never uses a tensor or blob name as a file name.
  EXPECT_EQ(FilesUnder(native), (std::vector<std::string>{"manifest", "rank-0.data", "rank-0.meta"}));

  const std::string ucp = root_ + "/ckpt/ucp";
  ConvertOptions options;
  options.threads = 1;
  Result<ConvertSummary> s = ConvertNativeToUniversal(fs_, native, ucp, options);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  // '/' and a leading '.' are escaped: each name is one file inside params/.
  EXPECT_EQ(FilesUnder(ucp), (std::vector<std::string>{"blobs.safetensors", "manifest.json", "manifest.pb",
                                                       "params/%2E.%2F..%2Fescape.safetensors",
                                                       "params/%2Fabs%2Fx.safetensors",
                                                       "params/a%2F..%2F..%2Fb.safetensors"}));
  // Nothing was written next to the checkpoint root.
  EXPECT_EQ(FilesUnder(root_).size(), FilesUnder(native).size() + FilesUnder(ucp).size());
  // And the data reads back under the original names.
  Result<proto::UniversalManifest> m = ReadUniversalManifest(fs_, ucp);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  Result<std::vector<uint8_t>> bytes = ReadUniversalTensor(fs_, ucp, *m, "../../escape", "fp32");
  ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
  ASSERT_EQ(bytes->size(), 16u);
  float first = 0;
  std::memcpy(&first, bytes->data(), 4);
  EXPECT_EQ(first, 1.0f);
}

// A manifest edited to point outside the checkpoint is refused before any file is opened.
TEST_F(NamesTest, UniversalManifestNamingAFileOutsideIsRefused) {
  const std::string native = WriteNative({"w"}, "rng");
  const std::string ucp = root_ + "/ckpt/ucp";
  ConvertOptions options;
  options.threads = 1;
  ASSERT_TRUE(ConvertNativeToUniversal(fs_, native, ucp, options).ok());
  Result<proto::UniversalManifest> m = ReadUniversalManifest(fs_, ucp);
  ASSERT_TRUE(m.ok()) << m.status().ToString();

  auto rewrite = [&](const proto::UniversalManifest& edited) {
    std::string pb;
    ASSERT_TRUE(edited.SerializeToString(&pb));
    std::ofstream(ucp + "/manifest.pb", std::ios::binary | std::ios::trunc) << pb;
  };
  proto::UniversalManifest tensor_out = *m;
  tensor_out.mutable_params(0)->mutable_states(0)->set_file("../../native/rank-0.data");
  rewrite(tensor_out);
  Result<proto::UniversalManifest> r1 = ReadUniversalManifest(fs_, ucp);
  EXPECT_EQ(r1.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(r1.status().message(), ucp + "/manifest.pb: tensor 'w' names file '../../native/rank-0.data'");

  proto::UniversalManifest blob_out = *m;
  blob_out.mutable_blobs(0)->set_file("/etc/passwd");
  rewrite(blob_out);
  Result<proto::UniversalManifest> r2 = ReadUniversalManifest(fs_, ucp);
  EXPECT_EQ(r2.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(r2.status().message(), ucp + "/manifest.pb: blob 'rng' of rank 0 names file '/etc/passwd'");
}

}  // namespace
}  // namespace memento
