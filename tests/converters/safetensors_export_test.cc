// safetensors export (cast, sharding with the Hugging Face index) and import, from a DeepSpeed
// fixture consolidated into a universal checkpoint; exact casts of known values.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "converters/deepspeed.h"
#include "converters/safetensors_export.h"
#include "core/file_system.h"
#include "ucp_format/safetensors.h"
#include "ucp_format/universal.h"

#include "tests/converters/test_util.h"

namespace memento {
namespace {

using test::Slurp;
using test::TestRoot;

std::vector<uint16_t> Cast16(DType to, const std::vector<float>& v) {
  Result<std::vector<uint8_t>> r = CastElements(DType::kF32, to, reinterpret_cast<const uint8_t*>(v.data()), v.size());
  EXPECT_TRUE(r.ok());
  std::vector<uint16_t> out(v.size());
  std::memcpy(out.data(), r->data(), r->size());
  return out;
}

TEST(SafetensorsCastTest, RoundsToNearestEven) {
  EXPECT_EQ(Cast16(DType::kBF16, {1.0f, 1.00390625f, 1.01171875f, -2.0f, 0.0f}),
            (std::vector<uint16_t>{0x3f80, 0x3f80, 0x3f82, 0xc000, 0x0000}));
  EXPECT_EQ(Cast16(DType::kF16, {1.0f, 65504.0f, 65520.0f, 0.1f, 5.960464477539063e-08f, -0.0f, 1e-9f}),
            (std::vector<uint16_t>{0x3c00, 0x7bff, 0x7c00, 0x2e66, 0x0001, 0x8000, 0x0000}));
  const std::vector<uint16_t> half = {0x3c00, 0x0001, 0xfbff};
  Result<std::vector<uint8_t>> back = CastElements(DType::kF16, DType::kF32, reinterpret_cast<const uint8_t*>(half.data()), 3);
  ASSERT_TRUE(back.ok());
  std::vector<float> f(3);
  std::memcpy(f.data(), back->data(), 12);
  EXPECT_EQ(f, (std::vector<float>{1.0f, 5.960464477539063e-08f, -65504.0f}));
  EXPECT_EQ(CastElements(DType::kI64, DType::kF32, nullptr, 0).status().ToString(), "InvalidArgument: cannot cast I64 to F32");
}

TEST(SafetensorsExportTest, ShardedBf16ExportAndImportReadBackEqual) {
  const std::string fixture = std::string(MEMENTO_SOURCE_DIR) + "/tests/converters/fixtures/deepspeed/tp2_dp2_zero2";
  if (!std::filesystem::exists(fixture)) GTEST_SKIP() << "no fixture";
  FileSystem* fs = PosixFileSystem();
  const std::string root = TestRoot();
  ASSERT_TRUE(ImportDeepSpeed(fs, fixture, root + "/ucp").ok());
  Result<proto::UniversalManifest> m = ReadUniversalManifest(fs, root + "/ucp");
  ASSERT_TRUE(m.ok());

  // One file, dtypes kept.
  Result<SafetensorsExportSummary> one = ExportSafetensors(fs, root + "/ucp", root + "/st1");
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  EXPECT_EQ(one->files, (std::vector<std::string>{"model.safetensors"}));
  EXPECT_EQ(one->tensors, 12);
  Result<std::unique_ptr<SafetensorsFile>> f1 = SafetensorsFile::Open(fs, root + "/st1/model.safetensors");
  ASSERT_TRUE(f1.ok()) << f1.status().ToString();
  for (const proto::UniversalParam& p : m->params()) {
    Result<std::vector<uint8_t>> want = ReadUniversalTensor(fs, root + "/ucp", *m, p.name(), "fp32");
    Result<std::vector<uint8_t>> got = (*f1)->Read(p.name());
    ASSERT_TRUE(want.ok() && got.ok()) << p.name();
    EXPECT_TRUE(*want == *got) << p.name();
  }

  // bf16, files of at most 1 KiB of data, with the index.
  SafetensorsExportOptions o;
  o.dtype = DType::kBF16;
  o.shard_bytes = 1024;
  Result<SafetensorsExportSummary> sharded = ExportSafetensors(fs, root + "/ucp", root + "/st2", o);
  ASSERT_TRUE(sharded.ok()) << sharded.status().ToString();
  ASSERT_GE(sharded->files.size(), 3u);
  const size_t n = sharded->files.size() - 1;
  EXPECT_EQ(sharded->files.back(), "model.safetensors.index.json");
  char first[64];
  std::snprintf(first, sizeof(first), "model-00001-of-%05zu.safetensors", n);
  EXPECT_EQ(sharded->files[0], first);
  const std::string index = Slurp(root + "/st2/model.safetensors.index.json");
  EXPECT_EQ(index.rfind("{\"metadata\":{\"total_size\":" + std::to_string(sharded->bytes) + "},\"weight_map\":{", 0), 0u) << index;
  EXPECT_NE(index.find("\"0.attn.dense.weight\":\"" + std::string(first) + "\""), std::string::npos) << index;
  std::map<std::string, std::vector<uint8_t>> got;
  for (size_t i = 0; i < n; ++i) {
    Result<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(fs, root + "/st2/" + sharded->files[i]);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    EXPECT_LE((*f)->entries().back().end, 1024u + 2 * 56 * 8);  // only a tensor larger than a shard exceeds it
    for (const SafetensorsEntry& e : (*f)->entries()) {
      EXPECT_EQ(e.dtype, DType::kBF16);
      got[e.key] = *(*f)->Read(e.key);
    }
  }
  ASSERT_EQ(got.size(), 12u);
  for (const proto::UniversalParam& p : m->params()) {
    Result<std::vector<uint8_t>> want = ReadUniversalTensor(fs, root + "/ucp", *m, p.name(), "fp32");
    Result<std::vector<uint8_t>> cast = CastElements(DType::kF32, DType::kBF16, want->data(), want->size() / 4);
    EXPECT_TRUE(*cast == got[p.name()]) << p.name();
  }

  // Import the sharded files as a universal checkpoint: the bf16 values come back unchanged.
  Result<ConvertSummary> imp = ImportSafetensors(fs, root + "/st2", root + "/ucp2");
  ASSERT_TRUE(imp.ok()) << imp.status().ToString();
  Result<proto::UniversalManifest> m2 = ReadUniversalManifest(fs, root + "/ucp2");
  ASSERT_TRUE(m2.ok());
  EXPECT_EQ(m2->params_size(), 12);
  for (const auto& [name, bytes] : got) {
    Result<std::vector<uint8_t>> back = ReadUniversalTensor(fs, root + "/ucp2", *m2, name, "fp32");
    ASSERT_TRUE(back.ok()) << name;
    EXPECT_TRUE(*back == bytes) << name;
  }
  EXPECT_EQ(ExportSafetensors(fs, root + "/ucp", root + "/st1").status().ToString(),
            "AlreadyExists: " + root + "/st1 already exists; the safetensors export needs a new path");
  EXPECT_EQ(ExportSafetensors(fs, root + "/nothing", root + "/st3").status().ToString(),
            "NotFound: " + root + "/nothing: neither a universal (manifest.pb) nor a native (manifest) checkpoint");
}

}  // namespace
}  // namespace memento
