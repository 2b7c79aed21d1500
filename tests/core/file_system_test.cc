// Tests of the POSIX FileSystem (exact bytes through aligned and O_DIRECT writes, modes, errors that
// name the path) and of FaultInjectionFileSystem (ENOSPC/EIO at exact points, short writes, crashes).
#include "core/file_system.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace memento {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

// Deterministic bytes that differ at every offset and between seeds.
std::string Pattern(size_t n, uint64_t seed) {
  std::string s(n, '\0');
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(s.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return s;
}

// Appends `data` in pieces of `chunk` bytes, then closes.
Status WriteInChunks(FileSystem* fs, const std::string& path, const std::string& data, const WriteOptions& options,
                     size_t chunk) {
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, fs->NewWritableFile(path, options));
  for (size_t at = 0; at < data.size(); at += chunk) {
    MEMENTO_RETURN_IF_ERROR(file->Append(data.data() + at, std::min(chunk, data.size() - at)));
  }
  if (file->size() != data.size()) return Internal("size() is " + std::to_string(file->size()));
  return file->Close();
}

// Compares without printing megabytes on failure.
void ExpectSameBytes(const std::string& got, const std::string& want) {
  ASSERT_EQ(got.size(), want.size());
  const auto [g, w] = std::mismatch(got.begin(), got.end(), want.begin());
  EXPECT_TRUE(g == got.end()) << "first difference at byte " << (g - got.begin());
}

uint32_t ModeOf(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

class FileSystemTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("MEMENTO_TEST_TMP");
    const std::string root = tmp != nullptr ? tmp : ::testing::TempDir();
    dir_ = root + "/" + ::testing::UnitTest::GetInstance()->current_test_info()->name();
    ASSERT_TRUE(fs_->RemoveAll(dir_).ok());
    const Status st = fs_->CreateDirs(dir_);
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  void TearDown() override { EXPECT_TRUE(fs_->RemoveAll(dir_).ok()); }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  FileSystem* const fs_ = PosixFileSystem();
  std::string dir_;
};

TEST_F(FileSystemTest, RoundTripsEverySizeWithAndWithoutDirectIo) {
  const std::vector<size_t> sizes = {0, 1, 4095, 4096, 4097, 16 * kMiB + 3};
  const std::vector<size_t> buffers = {4096, 5000, 1 * kMiB};  // 5000 rounds up to 8192
  int seed = 0;
  for (const bool direct : {true, false}) {
    for (const size_t buffer : buffers) {
      for (const size_t size : sizes) {
        SCOPED_TRACE("direct_io=" + std::to_string(direct) + " buffer=" + std::to_string(buffer) +
                     " size=" + std::to_string(size));
        const std::string data = Pattern(size, ++seed);
        const std::string path = Path("data-" + std::to_string(seed));
        WriteOptions options;
        options.direct_io = direct;
        options.buffer_bytes = buffer;
        // Odd chunks straddle the buffer and 4 KiB boundaries.
        const Status st = WriteInChunks(fs_, path, data, options, size > kMiB ? 777'777 : 1000);
        ASSERT_TRUE(st.ok()) << st.ToString();
        Result<uint64_t> file_size = fs_->FileSize(path);
        ASSERT_TRUE(file_size.ok()) << file_size.status().ToString();
        EXPECT_EQ(*file_size, size);
        Result<std::string> got = ReadFileToString(fs_, path);
        ASSERT_TRUE(got.ok()) << got.status().ToString();
        ExpectSameBytes(*got, data);
        ASSERT_TRUE(fs_->RemoveFile(path).ok());
      }
    }
  }
}

TEST_F(FileSystemTest, SyncMidFileLeavesExactSizeAndLaterAppendsContinue) {
  for (const bool direct : {true, false}) {
    SCOPED_TRACE("direct_io=" + std::to_string(direct));
    const std::string data = Pattern(3 * 5000 + 1, direct ? 1 : 2);
    const std::string path = Path(direct ? "direct" : "buffered");
    WriteOptions options;
    options.direct_io = direct;
    options.buffer_bytes = 4096;
    Result<std::unique_ptr<WritableFile>> file = fs_->NewWritableFile(path, options);
    ASSERT_TRUE(file.ok()) << file.status().ToString();
    for (size_t at = 0; at < data.size(); at += 5000) {
      const size_t n = std::min<size_t>(5000, data.size() - at);
      ASSERT_TRUE((*file)->Append(data.data() + at, n).ok());
      const Status st = (*file)->Sync();
      ASSERT_TRUE(st.ok()) << st.ToString();
      EXPECT_EQ(*fs_->FileSize(path), at + n);
      EXPECT_EQ((*file)->size(), at + n);
    }
    ASSERT_TRUE((*file)->Close().ok());
    EXPECT_EQ((*file)->Append("x", 1).code(), StatusCode::kFailedPrecondition);
    ExpectSameBytes(*ReadFileToString(fs_, path), data);
  }
}

TEST_F(FileSystemTest, DirectIoOnTmpfsRoundTrips) {
  const char* prefix = std::getenv("MEMENTO_TEST_PREFIX");
  if (prefix == nullptr || !fs_->Exists("/dev/shm")) GTEST_SKIP() << "needs tests/mpi_run.sh and /dev/shm";
  // tests/mpi_run.sh removes /dev/shm/memento-<prefix>* even when the test fails.
  const std::string path = std::string("/dev/shm/memento-") + prefix + "-file-system";
  const std::string data = Pattern(3 * 4096 + 5, 7);
  WriteOptions options;
  options.buffer_bytes = 4096;
  ASSERT_TRUE(WriteInChunks(fs_, path, data, options, 1000).ok());
  ExpectSameBytes(*ReadFileToString(fs_, path), data);
  EXPECT_TRUE(fs_->RemoveFile(path).ok());
}

TEST_F(FileSystemTest, NewFilesAndDirectoriesGetExactModes) {
  const mode_t old_umask = ::umask(0077);
  WriteOptions options;
  options.mode = 0640;  // the umask would clear the group bit without fchmod
  ASSERT_TRUE(WriteInChunks(fs_, Path("group-readable"), "x", options, 1).ok());
  ::umask(0022);
  ASSERT_TRUE(WriteInChunks(fs_, Path("default"), "x", WriteOptions{}, 1).ok());
  ASSERT_TRUE(fs_->CreateDirs(Path("a/b/c")).ok());
  ::umask(old_umask);
  EXPECT_EQ(ModeOf(Path("group-readable")), 0640u);
  EXPECT_EQ(ModeOf(Path("default")), 0600u);
  EXPECT_EQ(ModeOf(Path("a")), 0700u);
  EXPECT_EQ(ModeOf(Path("a/b/c")), 0700u);
}

TEST_F(FileSystemTest, CreateDirsIsIdempotentAndRefusesAFileInTheWay) {
  ASSERT_TRUE(fs_->CreateDirs(Path("x/y/")).ok());
  ASSERT_TRUE(fs_->CreateDirs(Path("x/y")).ok());
  EXPECT_EQ(*fs_->ListDir(Path("x")), std::vector<std::string>{"y"});
  ASSERT_TRUE(WriteFileAtomically(fs_, Path("file"), "f").ok());
  const Status st = fs_->CreateDirs(Path("file/sub"));
  EXPECT_EQ(st.code(), StatusCode::kIOError);
  EXPECT_EQ(st.message(), "mkdir(" + Path("file") + "): Not a directory");
}

TEST_F(FileSystemTest, ReadAtPastEndIsDataLossWithExactMessage) {
  const std::string path = Path("ten");
  ASSERT_TRUE(WriteFileAtomically(fs_, path, "0123456789").ok());
  Result<std::unique_ptr<ReadableFile>> file = fs_->NewReadableFile(path);
  ASSERT_TRUE(file.ok());
  EXPECT_EQ((*file)->size(), 10u);
  char buf[16] = {};
  ASSERT_TRUE((*file)->ReadAt(3, buf, 7).ok());
  EXPECT_EQ(std::string(buf, 7), "3456789");
  Status st = (*file)->ReadAt(8, buf, 5);
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_EQ(st.message(), path + ": wanted 5 bytes at offset 8, file has 10");
  st = (*file)->ReadAt(100, buf, 1);
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_EQ(st.message(), path + ": wanted 1 bytes at offset 100, file has 10");
}

TEST_F(FileSystemTest, ErrorsNameThePath) {
  const std::string missing = Path("no/such/file");
  Result<std::unique_ptr<WritableFile>> w = fs_->NewWritableFile(missing);
  EXPECT_EQ(w.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(w.status().message(), "open(" + missing + "): No such file or directory");
  Result<std::unique_ptr<ReadableFile>> r = fs_->NewReadableFile(missing);
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(fs_->FileSize(missing).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(fs_->RemoveFile(missing).message(), "unlink(" + missing + "): No such file or directory");
  EXPECT_EQ(fs_->FileSize(dir_).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_FALSE(fs_->Exists(missing));
}

TEST_F(FileSystemTest, WriteFileAtomicallyReplacesContentAndLeavesNoTemporaryFiles) {
  const std::string path = Path("manifest");
  ASSERT_TRUE(WriteFileAtomically(fs_, path, "old manifest").ok());
  ASSERT_TRUE(WriteFileAtomically(fs_, path, "new").ok());
  EXPECT_EQ(*ReadFileToString(fs_, path), "new");
  EXPECT_EQ(ModeOf(path), 0600u);
  ASSERT_TRUE(WriteFileAtomically(fs_, path, "").ok());
  EXPECT_EQ(*ReadFileToString(fs_, path), "");
  EXPECT_EQ(*fs_->ListDir(dir_), std::vector<std::string>{"manifest"});
}

TEST_F(FileSystemTest, ListDirIsSortedAndNotFoundWhenMissing) {
  for (const char* name : {"b", "c2", "a", "c10"}) ASSERT_TRUE(WriteFileAtomically(fs_, Path(name), name).ok());
  ASSERT_TRUE(fs_->CreateDirs(Path("d")).ok());
  EXPECT_EQ(*fs_->ListDir(dir_), (std::vector<std::string>{"a", "b", "c10", "c2", "d"}));
  EXPECT_EQ(*fs_->ListDir(Path("d")), std::vector<std::string>{});
  Result<std::vector<std::string>> missing = fs_->ListDir(Path("nope"));
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(missing.status().message(), "opendir(" + Path("nope") + "): No such file or directory");
}

TEST_F(FileSystemTest, RemoveAllRemovesATreeAndIsOkWhenMissing) {
  ASSERT_TRUE(fs_->CreateDirs(Path("tree/a/b")).ok());
  ASSERT_TRUE(fs_->CreateDirs(Path("tree/empty")).ok());
  ASSERT_TRUE(WriteFileAtomically(fs_, Path("tree/top"), "1").ok());
  ASSERT_TRUE(WriteFileAtomically(fs_, Path("tree/a/b/leaf"), "2").ok());
  ASSERT_EQ(::symlink(dir_.c_str(), Path("tree/a/link-out").c_str()), 0);  // must not be followed
  ASSERT_TRUE(WriteFileAtomically(fs_, Path("keep"), "3").ok());
  ASSERT_TRUE(fs_->RemoveAll(Path("tree")).ok());
  EXPECT_FALSE(fs_->Exists(Path("tree")));
  EXPECT_EQ(*fs_->ListDir(dir_), std::vector<std::string>{"keep"});
  EXPECT_TRUE(fs_->RemoveAll(Path("tree")).ok());
  ASSERT_TRUE(fs_->RemoveAll(Path("keep")).ok());  // a plain file
  EXPECT_EQ(*fs_->ListDir(dir_), std::vector<std::string>{});
}

TEST_F(FileSystemTest, RenameReplacesTheTarget) {
  ASSERT_TRUE(WriteFileAtomically(fs_, Path("from"), "new").ok());
  ASSERT_TRUE(WriteFileAtomically(fs_, Path("to"), "old").ok());
  ASSERT_TRUE(fs_->Rename(Path("from"), Path("to")).ok());
  EXPECT_EQ(*ReadFileToString(fs_, Path("to")), "new");
  EXPECT_FALSE(fs_->Exists(Path("from")));
  EXPECT_EQ(fs_->Rename(Path("from"), Path("to")).code(), StatusCode::kNotFound);
}

// ---- FaultInjectionFileSystem ----

std::unique_ptr<FaultInjectionFileSystem> FaultFs(const std::string& spec) {
  Result<std::unique_ptr<FaultInjectionFileSystem>> fs = FaultInjectionFileSystem::FromSpec(PosixFileSystem(), spec);
  EXPECT_TRUE(fs.ok()) << fs.status().ToString();
  return fs.ok() ? std::move(fs).value() : nullptr;
}

TEST_F(FileSystemTest, EnospcAfterStopsWritesAtTheExactByteCount) {
  auto fault = FaultFs("enospc_after=10000");
  ASSERT_NE(fault, nullptr);
  const std::string path = Path("rank-0.data");
  const std::string data = Pattern(10000, 3);
  WriteOptions options;
  options.buffer_bytes = 4096;
  Result<std::unique_ptr<WritableFile>> file = fault->NewWritableFile(path, options);
  ASSERT_TRUE(file.ok());
  for (size_t at = 0; at < 9000; at += 3000) ASSERT_TRUE((*file)->Append(data.data() + at, 3000).ok());
  EXPECT_EQ(fault->injected_faults(), 0u);
  Status st = (*file)->Append(data.data() + 9000, 3000);  // would reach 12000
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(st.retryable());
  EXPECT_EQ(st.message(), "write(" + path + "): No space left on device");
  EXPECT_EQ(fault->injected_faults(), 1u);
  EXPECT_EQ((*file)->size(), 9000u);  // the failed Append wrote nothing
  ASSERT_TRUE((*file)->Append(data.data() + 9000, 1000).ok());  // exactly 10000
  EXPECT_EQ((*file)->Append("x", 1).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(fault->injected_faults(), 2u);
  ASSERT_TRUE((*file)->Close().ok());
  ExpectSameBytes(*ReadFileToString(fault.get(), path), data);
  // The budget is for all files together.
  Result<std::unique_ptr<WritableFile>> other = fault->NewWritableFile(Path("rank-1.data"), options);
  ASSERT_TRUE(other.ok());
  EXPECT_EQ((*other)->Append("y", 1).code(), StatusCode::kResourceExhausted);
}

TEST_F(FileSystemTest, EioAfterFailsWritesWithIoError) {
  FaultInjectionFileSystem fault(PosixFileSystem());
  fault.FailWritesAfter(100, EIO);
  const std::string path = Path("eio");
  Result<std::unique_ptr<WritableFile>> file = fault.NewWritableFile(path);
  ASSERT_TRUE(file.ok());
  const std::string data = Pattern(101, 4);
  ASSERT_TRUE((*file)->Append(data.data(), 100).ok());
  const Status st = (*file)->Append(data.data() + 100, 1);
  EXPECT_EQ(st.code(), StatusCode::kIOError);
  EXPECT_EQ(st.message(), "write(" + path + "): Input/output error");
  EXPECT_EQ(fault.injected_faults(), 1u);
}

TEST_F(FileSystemTest, EnospcWhileFailsUntilThePathIsDeleted) {
  const std::string marker = Path("disk-full");
  ASSERT_TRUE(WriteFileAtomically(fs_, marker, "").ok());
  auto fault = FaultFs("enospc_while=" + marker);
  ASSERT_NE(fault, nullptr);
  const std::string path = Path("step-3.data");
  Result<std::unique_ptr<WritableFile>> file = fault->NewWritableFile(path);
  ASSERT_TRUE(file.ok());
  Status st = (*file)->Append("abc", 3);
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(st.message(), "write(" + path + "): No space left on device");
  EXPECT_EQ((*file)->Sync().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(fault->injected_faults(), 2u);
  ASSERT_TRUE(fs_->RemoveFile(marker).ok());  // space returns
  ASSERT_TRUE((*file)->Append("abc", 3).ok());
  ASSERT_TRUE((*file)->Close().ok());
  EXPECT_EQ(*ReadFileToString(fs_, path), "abc");
  EXPECT_EQ(fault->injected_faults(), 2u);
}

TEST_F(FileSystemTest, FailedWriteFileAtomicallyKeepsTheOldFileAndRemovesTheTemporary) {
  const std::string path = Path("manifest");
  ASSERT_TRUE(WriteFileAtomically(fs_, path, "old").ok());
  FaultInjectionFileSystem fault(PosixFileSystem());
  fault.FailWritesAfter(0, ENOSPC);
  const Status st = WriteFileAtomically(&fault, path, "new");
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  const std::string tmp_prefix = path + ".tmp." + std::to_string(::getpid()) + ".";
  EXPECT_EQ(st.message().rfind("write(" + tmp_prefix, 0), 0u) << st.message();
  EXPECT_NE(st.message().find("): No space left on device"), std::string::npos) << st.message();
  EXPECT_EQ(*ReadFileToString(fs_, path), "old");
  EXPECT_EQ(*fs_->ListDir(dir_), std::vector<std::string>{"manifest"});
}

TEST_F(FileSystemTest, EioReadFailsOnlyMatchingPaths) {
  auto fault = FaultFs("eio_read=rank-1");
  ASSERT_NE(fault, nullptr);
  ASSERT_TRUE(WriteFileAtomically(fault.get(), Path("rank-1.data"), "one").ok());
  ASSERT_TRUE(WriteFileAtomically(fault.get(), Path("rank-2.data"), "two").ok());
  Result<std::string> bad = ReadFileToString(fault.get(), Path("rank-1.data"));
  EXPECT_EQ(bad.status().code(), StatusCode::kIOError);
  EXPECT_EQ(bad.status().message(), "read(" + Path("rank-1.data") + "): Input/output error");
  EXPECT_EQ(fault->injected_faults(), 1u);
  EXPECT_EQ(*ReadFileToString(fault.get(), Path("rank-2.data")), "two");
  EXPECT_EQ(*ReadFileToString(fs_, Path("rank-1.data")), "one");  // the data itself is fine
  EXPECT_EQ(fault->injected_faults(), 1u);
}

TEST_F(FileSystemTest, ShortWritesStillProduceIdenticalBytes) {
  auto fault = FaultFs("short_writes=1");
  ASSERT_NE(fault, nullptr);
  // One Append of 1000 bytes goes down as 500, 250, 125, 63, 32, 16, 8, 4, 2, 1, 1: ten splits.
  const std::string small = Pattern(1000, 5);
  ASSERT_TRUE(WriteInChunks(fault.get(), Path("small"), small, WriteOptions{}, small.size()).ok());
  EXPECT_EQ(fault->injected_faults(), 10u);
  ExpectSameBytes(*ReadFileToString(fs_, Path("small")), small);
  for (const bool direct : {true, false}) {
    const std::string data = Pattern(kMiB + 5, direct ? 6 : 7);
    WriteOptions options;
    options.direct_io = direct;
    options.buffer_bytes = 8192;
    ASSERT_TRUE(WriteInChunks(fault.get(), Path("big"), data, options, 100'001).ok());
    ExpectSameBytes(*ReadFileToString(fs_, Path("big")), data);
  }
  EXPECT_GT(fault->injected_faults(), 10u);
}

TEST_F(FileSystemTest, DropUnsyncedDataCutsFilesBackToTheirLastSync) {
  FaultInjectionFileSystem fault(PosixFileSystem());
  WriteOptions options;
  options.buffer_bytes = 4096;
  const std::string data = Pattern(25000, 8);

  // Synced at 5000 bytes, then 20000 more that reach the disk but are never synced.
  const std::string partly = Path("partly-synced");
  auto file = std::move(fault.NewWritableFile(partly, options)).value();
  ASSERT_TRUE(file->Append(data.data(), 5000).ok());
  ASSERT_TRUE(file->Sync().ok());
  ASSERT_TRUE(file->Append(data.data() + 5000, 20000).ok());
  // Never synced at all.
  const std::string unsynced = Path("never-synced");
  auto lost = std::move(fault.NewWritableFile(unsynced, options)).value();
  ASSERT_TRUE(lost->Append(data.data(), 20000).ok());
  // Closed (so synced), and written atomically (synced, then renamed).
  ASSERT_TRUE(WriteInChunks(&fault, Path("closed"), data, options, 3000).ok());
  ASSERT_TRUE(WriteFileAtomically(&fault, Path("manifest"), "m").ok());
  // A file removed through the wrapper is forgotten: nothing to drop.
  ASSERT_TRUE(WriteInChunks(&fault, Path("removed"), "r", options, 1).ok());
  ASSERT_TRUE(fault.RemoveFile(Path("removed")).ok());

  EXPECT_GT(*fs_->FileSize(partly), 5000u);
  EXPECT_GT(*fs_->FileSize(unsynced), 0u);
  file.reset();  // the crash: buffered bytes vanish with the process
  lost.reset();
  const Status st = fault.DropUnsyncedData();
  ASSERT_TRUE(st.ok()) << st.ToString();

  EXPECT_EQ(*fs_->FileSize(partly), 5000u);
  ExpectSameBytes(*ReadFileToString(fs_, partly), data.substr(0, 5000));
  EXPECT_FALSE(fs_->Exists(unsynced));
  EXPECT_EQ(*fs_->FileSize(Path("closed")), 25000u);
  EXPECT_EQ(*ReadFileToString(fs_, Path("manifest")), "m");
  EXPECT_EQ(*fs_->ListDir(dir_), (std::vector<std::string>{"closed", "manifest", "partly-synced"}));
  // A second crash changes nothing.
  ASSERT_TRUE(fault.DropUnsyncedData().ok());
  EXPECT_EQ(*fs_->FileSize(partly), 5000u);
  EXPECT_EQ(fault.injected_faults(), 0u);
}

TEST_F(FileSystemTest, FromSpecParsesEveryKeyAndNamesTheBadOne) {
  EXPECT_NE(FaultFs(""), nullptr);
  EXPECT_NE(FaultFs("enospc_after=5,eio_after=7,enospc_while=/x,eio_read=rank,short_writes=0"), nullptr);
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"bogus=1", "fault spec: unknown key 'bogus'"},
      {"enospc_after=12x", "fault spec: enospc_after wants a byte count, got '12x'"},
      {"eio_after=", "fault spec: eio_after wants a byte count, got ''"},
      {"eio_after=-1", "fault spec: eio_after wants a byte count, got '-1'"},
      {"short_writes=2", "fault spec: short_writes wants 0 or 1, got '2'"},
      {"enospc_while=", "fault spec: enospc_while wants a non-empty value"},
      {"eio_read=x,enospc_after", "fault spec: 'enospc_after' is not key=value"},
  };
  for (const auto& [spec, message] : bad) {
    Result<std::unique_ptr<FaultInjectionFileSystem>> fs = FaultInjectionFileSystem::FromSpec(fs_, spec);
    EXPECT_EQ(fs.status().code(), StatusCode::kInvalidArgument) << spec;
    EXPECT_EQ(fs.status().message(), message) << spec;
  }
}

}  // namespace
}  // namespace memento
