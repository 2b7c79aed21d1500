// Tests of the `memento` CLI: writes small checkpoints with the library, runs the built binary and
// checks its exact output lines, JSON and exit codes for ls, inspect, verify, help and bad input.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/crc.h"
#include "core/dtype.h"
#include "core/shard.h"
#include "proto/shard_convert.h"
#include "ucp_format/native_checkpoint.h"
#include "tests/converters/test_util.h"

namespace memento {
namespace {

using test::Slurp;
using test::TestRoot;
using test::Quote;

constexpr int64_t kCreatedMs = 1717243200123;  // 2024-06-01T12:00:00.123Z

struct Output {
  int exit_code = -1;
  std::string out;
  std::string err;
};

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%016" PRIx64, v);
  return buf;
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = TestRoot();
    for (int r = 0; r < 2; ++r) {
      proto::RankRecord& l = layouts_[r];
      l.set_rank(r);
      l.set_world_size(2);
      proto::TensorRecord* w = l.add_tensors();  // [4,3] F32 split along dim 0: 2 rows each
      w->set_name("w");
      w->set_dtype(static_cast<int32_t>(DType::kF32));
      ToProto(*SplitEvenly({4, 3}, 0, 2, r), w->mutable_spec());
      w->set_slot_offset(0);
      w->set_bytes(24);
      proto::TensorRecord* b = l.add_tensors();  // [3] F32 replicated: rank r holds replica r
      b->set_name("b");
      b->set_dtype(static_cast<int32_t>(DType::kF32));
      ToProto(WholeTensor({3}, r), b->mutable_spec());
      b->set_slot_offset(4096);
      b->set_bytes(12);
      proto::BlobRecord* blob = l.add_blobs();
      blob->set_name("rng");
      blob->set_capacity(16);
      blob->set_slot_offset(8192);
      l.set_slot_bytes(12288);
      slots_[r].assign(12288, 0);
      for (int i = 0; i < 24; ++i) slots_[r][static_cast<size_t>(i)] = static_cast<uint8_t>(r * 24 + i);
      for (int i = 0; i < 12; ++i) slots_[r][4096 + static_cast<size_t>(i)] = static_cast<uint8_t>(100 + i);
      slots_[r][8192] = 8;  // blob length, little-endian u64
      for (int i = 0; i < 8; ++i) slots_[r][8200 + static_cast<size_t>(i)] = static_cast<uint8_t>(200 + r * 8 + i);
    }
  }

  // Writes both ranks of `job` at `step` under root_; commits unless told not to.
  std::string Write(const std::string& job, int64_t step, bool commit = true) {
    const std::string dir = CheckpointDir(root_, job, step);
    std::vector<proto::ManifestRank> entries;
    for (int r = 0; r < 2; ++r) {
      RankImage image{r, 2, &layouts_[r], slots_[r].data()};
      Result<proto::ManifestRank> e = WriteRankFiles(PosixFileSystem(), dir, job, step, image, PersistOptions{});
      EXPECT_TRUE(e.ok()) << e.status().ToString();
      if (e.ok()) entries.push_back(*e);
    }
    if (commit) {
      proto::Manifest m = BuildManifest(job, step, 2, entries);
      m.set_created_unix_ms(kCreatedMs);
      Status st = CommitManifest(PosixFileSystem(), dir, m);
      EXPECT_TRUE(st.ok()) << st.ToString();
    }
    return dir;
  }

  Output Run(const std::string& args) {
    const std::string err_path = root_ + "/.stderr";
    const std::string cmd = std::string(MEMENTO_BIN_DIR) + "/memento " + args + " 2>" + Quote(err_path);
    Output o;
    FILE* p = ::popen(cmd.c_str(), "r");
    if (p == nullptr) {
      ADD_FAILURE() << "popen " << cmd;
      return o;
    }
    char buf[4096];
    size_t n = 0;
    while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) o.out.append(buf, n);
    const int status = ::pclose(p);
    o.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    o.err = Slurp(err_path);
    return o;
  }

  std::string root_;
  proto::RankRecord layouts_[2];
  std::vector<uint8_t> slots_[2];
};

TEST_F(CliTest, HelpAndUsageErrors) {
  Output o = Run("--help");
  EXPECT_EQ(o.exit_code, 0);
  EXPECT_EQ(o.out.substr(0, o.out.find('\n')), "usage: memento <command> [--json] <path>");
  o = Run("verify --help");
  EXPECT_EQ(o.exit_code, 0);
  EXPECT_EQ(o.out.substr(0, o.out.find('\n')), "usage: memento verify [--json] <root>/<job>/step-<N>");
  o = Run("help ls");
  EXPECT_EQ(o.exit_code, 0);
  EXPECT_EQ(o.out.substr(0, o.out.find('\n')), "usage: memento ls [--json] <root>|<root>/<job>");

  o = Run("");
  EXPECT_EQ(o.exit_code, 2);
  EXPECT_EQ(o.err.substr(0, o.err.find('\n')), "memento: no command");
  o = Run("frob x");
  EXPECT_EQ(o.exit_code, 2);
  EXPECT_EQ(o.err.substr(0, o.err.find('\n')), "memento: unknown command 'frob'");
  o = Run("ls");
  EXPECT_EQ(o.exit_code, 2);
  EXPECT_EQ(o.err.substr(0, o.err.find('\n')), "memento ls: a path is required");
  o = Run("inspect --bogus x");
  EXPECT_EQ(o.exit_code, 2);
  EXPECT_EQ(o.err.substr(0, o.err.find('\n')), "memento inspect: unknown option '--bogus'");
  o = Run("verify a b");
  EXPECT_EQ(o.exit_code, 2);
  EXPECT_EQ(o.err.substr(0, o.err.find('\n')), "memento verify: one path expected, got 'a' and 'b'");
  EXPECT_EQ(o.out, "");
}

TEST_F(CliTest, LsListsEveryJobUnderARootAndOneJob) {
  Write("train", 5);
  Write("train", 9, /*commit=*/false);
  Write("eval", 1);
  // rank 0: w [0,24) b [4096,4108) rng [8192,8200); rank 1: w [0,24) rng [4096,4104).
  Output o = Run("ls " + Quote(root_));
  EXPECT_EQ(o.exit_code, 0) << o.err;
  EXPECT_EQ(o.out,
            "JOB    STEP  STATE      SIZE      RANKS\n"
            "eval   1     committed  12.0 KiB  2\n"
            "train  5     committed  12.0 KiB  2\n"
            "train  9     partial    12.0 KiB  2\n");
  EXPECT_EQ(o.err, "");

  o = Run("ls " + Quote(root_ + "/train/"));
  EXPECT_EQ(o.exit_code, 0) << o.err;
  EXPECT_EQ(o.out,
            "JOB    STEP  STATE      SIZE      RANKS\n"
            "train  5     committed  12.0 KiB  2\n"
            "train  9     partial    12.0 KiB  2\n");

  o = Run("ls --json " + Quote(root_ + "/train"));
  EXPECT_EQ(o.exit_code, 0) << o.err;
  const std::string t = root_ + "/train";
  EXPECT_EQ(o.out, "{\"path\":\"" + t + "\",\"checkpoints\":[" +
                       "{\"job\":\"train\",\"step\":5,\"dir\":\"" + t + "/step-5\",\"state\":\"committed\"," +
                       "\"bytes\":12304,\"ranks\":2}," +
                       "{\"job\":\"train\",\"step\":9,\"dir\":\"" + t + "/step-9\",\"state\":\"partial\"," +
                       "\"bytes\":12304,\"ranks\":2,\"reason\":\"" + t +
                       "/step-9 has no manifest: not a committed checkpoint\"}]}\n");

  std::filesystem::create_directories(root_ + "/empty");
  o = Run("ls " + Quote(root_ + "/empty"));
  EXPECT_EQ(o.exit_code, 0);
  EXPECT_EQ(o.out, "no checkpoints under " + root_ + "/empty\n");
}

TEST_F(CliTest, JsonEscapesNames) {
  const std::string job = "q\"uo\\te\tjob";
  Write(job, 3);
  Output o = Run("ls --json " + Quote(root_));
  EXPECT_EQ(o.exit_code, 0) << o.err;
  EXPECT_NE(o.out.find("\"job\":\"q\\\"uo\\\\te\\tjob\",\"step\":3"), std::string::npos) << o.out;
}

TEST_F(CliTest, InspectShowsManifestTensorsAndBlobs) {
  const std::string dir = Write("train", 5);
  Output o = Run("inspect " + Quote(dir));
  EXPECT_EQ(o.exit_code, 0) << o.err;
  const std::string b0 = Hex(Crc64(&slots_[0][4096], 12));
  const std::string r0 = Hex(Crc64(&slots_[0][8200], 8));
  const std::string r1 = Hex(Crc64(&slots_[1][8200], 8));
  EXPECT_EQ(o.out,
            "checkpoint   " + dir + "\n"
            "job          train\n"
            "step         5\n"
            "world size   2\n"
            "created      2024-06-01T12:00:00.123Z\n"
            "total bytes  12304 (12.0 KiB)\n"
            "format       1 (memento 0.1.0)\n"
            "\n"
            "TENSOR  DTYPE  SHAPE  FRAGMENTS                 BYTES  CRC\n"
            "w       F32    [4,3]  2 (2 written)             48     2 chunks\n"
            "b       F32    [3]    2 (1 written, 1 replica)  12     " + b0 + "\n"
            "\n"
            "BLOB  RANK  BYTES  CRC\n"
            "rng   0     8      " + r0 + "\n"
            "rng   1     8      " + r1 + "\n");

  o = Run("inspect --json " + Quote(dir));
  EXPECT_EQ(o.exit_code, 0) << o.err;
  const std::string& j = o.out;
  EXPECT_EQ(j.find("{\"dir\":\"" + dir + "\",\"job\":\"train\",\"step\":5,\"world_size\":2,"
                   "\"created_unix_ms\":1717243200123,\"created\":\"2024-06-01T12:00:00.123Z\","
                   "\"total_bytes\":12304,\"format_version\":1,\"library_version\":\"0.1.0\",\"ranks\":["),
            0u) << j;
  EXPECT_NE(j.find("{\"name\":\"w\",\"dtype\":\"F32\",\"shape\":[4,3],\"fragments\":2,\"written\":2,\"replicas\":0,"
                   "\"bytes\":48,\"chunks\":2,\"crc\":null}"),
            std::string::npos) << j;
  EXPECT_NE(j.find("{\"name\":\"b\",\"dtype\":\"F32\",\"shape\":[3],\"fragments\":2,\"written\":1,\"replicas\":1,"
                   "\"bytes\":12,\"chunks\":1,\"crc\":\"" + b0 + "\"}"),
            std::string::npos) << j;
  EXPECT_NE(j.find("\"blobs\":[{\"name\":\"rng\",\"rank\":0,\"bytes\":8,\"chunks\":1,\"crc\":\"" + r0 + "\"},"),
            std::string::npos) << j;
  EXPECT_EQ(j.back(), '\n');
  EXPECT_EQ(j.find('\n'), j.size() - 1);  // one line, one object
}

TEST_F(CliTest, VerifyIntactAndDamaged) {
  const std::string dir = Write("train", 5);
  Output o = Run("verify " + Quote(dir));
  EXPECT_EQ(o.exit_code, 0) << o.err;
  EXPECT_EQ(o.out, "OK: 2 tensors, 2 blobs, 76 bytes verified\n");
  o = Run("verify --json " + Quote(dir));
  EXPECT_EQ(o.exit_code, 0);
  EXPECT_EQ(o.out, "{\"dir\":\"" + dir + "\",\"ok\":true,\"tensors\":2,\"blobs\":2,\"bytes_verified\":76,"
                   "\"problems\":[]}\n");

  {
    std::fstream f(dir + "/rank-1.data", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(5);
    f.put('\x7f');
  }
  const std::string problem = dir + "/rank-1.data: tensor 'w' bytes 0..24: CRC mismatch";
  o = Run("verify " + Quote(dir));
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.out, problem + "\nFAILED: 1 problem in " + dir + "\n");
  o = Run("verify --json " + Quote(dir));
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.out, "{\"dir\":\"" + dir + "\",\"ok\":false,\"tensors\":2,\"blobs\":2,\"bytes_verified\":76,"
                   "\"problems\":[{\"file\":\"" + dir + "/rank-1.data\",\"tensor\":\"w\",\"begin\":0,\"end\":24,"
                   "\"what\":\"CRC mismatch\",\"message\":\"" + problem + "\"}]}\n");
}

TEST_F(CliTest, MissingAndMalformedInputNameThePath) {
  const std::string nope = root_ + "/nope";
  Output o = Run("inspect " + Quote(nope));
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.out, "");
  EXPECT_EQ(o.err, "memento inspect: " + nope + ": no such directory\n");
  o = Run("ls --json " + Quote(nope));
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.out, "{\"error\":\"" + nope + ": no such directory\",\"code\":\"NotFound\"}\n");

  const std::string partial = Write("train", 9, /*commit=*/false);
  o = Run("verify " + Quote(partial));
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.err, "memento verify: " + partial + " has no manifest: not a committed checkpoint\n");

  {
    std::ofstream f(partial + "/manifest", std::ios::binary);
    f << "not a manifest";
  }
  o = Run("inspect " + Quote(partial));
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(o.err, "memento inspect: " + partial + "/manifest: malformed manifest (not a Manifest record)\n");
}

}  // namespace
}  // namespace memento
