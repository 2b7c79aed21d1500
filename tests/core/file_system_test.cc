// Tests of the POSIX FileSystem (exact bytes through aligned and O_DIRECT writes, modes, errors that
// name the path) and of FaultInjectionFileSystem (ENOSPC/EIO at exact points, short writes, crashes).
#include "core/file_system.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>

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

// `n` bytes at a 4 KiB-aligned address, freed with std::free.
struct AlignedBytes {
  explicit AlignedBytes(const std::string& bytes)
      : data(static_cast<char*>(std::aligned_alloc(4096, (bytes.size() + 4095) / 4096 * 4096 + 4096))) {
    std::memcpy(data, bytes.data(), bytes.size());
  }
  ~AlignedBytes() { std::free(data); }
  AlignedBytes(const AlignedBytes&) = delete;
  AlignedBytes& operator=(const AlignedBytes&) = delete;
  char* const data;
};

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

// Every path of AppendStable and Append: in place from aligned memory with buffered bytes queued
// first, an aligned prefix in place and the rest copied, unaligned addresses and offsets copied,
// Syncs in between.
TEST_F(FileSystemTest, AppendStableAndLongAppendsRoundTripEveryAlignment) {
  const std::string data = Pattern(13 * kMiB + 4096 + 777, 21);
  const AlignedBytes src(data);
  // (offset into data, bytes, stable, sync after)
  struct Step {
    size_t at, n;
    bool stable, sync;
  };
  const std::vector<Step> steps = {
      {0, 8192, false, false},                 // two whole blocks buffered
      {8192, 2 * kMiB, true, false},           // aligned: the buffered blocks, then in place
      {8192 + 2 * kMiB, 100, false, true},     // unaligned offset, synced mid-block
      {8292 + 2 * kMiB, 2 * kMiB, true, false},  // unaligned address and offset: copied
      {8292 + 4 * kMiB, 4096 - 100, false, false},  // back to an aligned offset
      {8192 + 4 * kMiB + 4096, 3 * kMiB + 5, true, false},  // aligned prefix in place, 5 bytes copied
      {8197 + 7 * kMiB + 4096, 4096 - 5, false, false},
      {8192 + 7 * kMiB + 8192, 3 * kMiB, false, false},   // a long aligned Append: written in place
      {8192 + 10 * kMiB + 8192, 0, true, true},
  };
  size_t end = 0;
  for (const Step& s : steps) end = std::max(end, s.at + s.n);
  ASSERT_LE(end, data.size());
  int seed = 0;
  for (const bool direct : {true, false}) {
    for (const size_t buffer : {size_t{4096}, kMiB, 16 * kMiB}) {
      SCOPED_TRACE("direct_io=" + std::to_string(direct) + " buffer=" + std::to_string(buffer));
      const std::string path = Path("stable-" + std::to_string(++seed));
      WriteOptions options;
      options.direct_io = direct;
      options.buffer_bytes = buffer;
      Result<std::unique_ptr<WritableFile>> file = fs_->NewWritableFile(path, options);
      ASSERT_TRUE(file.ok()) << file.status().ToString();
      for (const Step& s : steps) {
        ASSERT_EQ((*file)->size(), s.at);
        const char* from = src.data + s.at;
        const Status st = s.stable ? (*file)->AppendStable(from, s.n) : (*file)->Append(from, s.n);
        ASSERT_TRUE(st.ok()) << st.ToString();
        if (s.sync) {
          const Status synced = (*file)->Sync();
          ASSERT_TRUE(synced.ok()) << synced.ToString();
          EXPECT_EQ(*fs_->FileSize(path), s.at + s.n);
          ExpectSameBytes(*ReadFileToString(fs_, path), data.substr(0, s.at + s.n));
        }
      }
      const Status closed = (*file)->Close();
      ASSERT_TRUE(closed.ok()) << closed.ToString();
      ExpectSameBytes(*ReadFileToString(fs_, path), data.substr(0, end));
    }
  }
}

// Append's contract: the caller may reuse its memory as soon as Append returns, also for long
// aligned runs that are written from it.
TEST_F(FileSystemTest, AppendDoesNotKeepTheCallersMemory) {
  const std::string data = Pattern(6 * kMiB, 22);
  for (const bool direct : {true, false}) {
    SCOPED_TRACE("direct_io=" + std::to_string(direct));
    const std::string path = Path(direct ? "direct" : "buffered");
    WriteOptions options;
    options.direct_io = direct;
    options.buffer_bytes = kMiB;
    Result<std::unique_ptr<WritableFile>> file = fs_->NewWritableFile(path, options);
    ASSERT_TRUE(file.ok());
    AlignedBytes src(data);
    std::vector<char> odd(kMiB + 1);
    for (size_t at = 0; at < data.size(); at += 2 * kMiB) {
      // A MiB from an aligned address (written in place), then one from an odd address (copied, or
      // in place without O_DIRECT); both scribbled over before the file is synced.
      ASSERT_TRUE((*file)->Append(src.data + at, kMiB).ok());
      std::memcpy(odd.data() + 1, data.data() + at + kMiB, kMiB);
      ASSERT_TRUE((*file)->Append(odd.data() + 1, kMiB).ok());
      std::memset(src.data + at, 0xA5, kMiB);
      std::memset(odd.data(), 0x5A, odd.size());
    }
    ASSERT_TRUE((*file)->Close().ok());
    ExpectSameBytes(*ReadFileToString(fs_, path), data);
  }
}

// A write that fails on the I/O thread (here: past RLIMIT_FSIZE, EFBIG) is reported, with the
// message of a synchronous write, by the next Append or Sync; the bytes taken stay taken, and once
// the cause is gone the failed write is retried and the file ends up whole.
TEST_F(FileSystemTest, FailedBackgroundWriteIsReportedByTheNextCallAndRetried) {
  constexpr rlim_t kLimit = 3 * kMiB;
  rlimit old_limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  if (old_limit.rlim_max != RLIM_INFINITY && old_limit.rlim_max < 16 * kMiB) GTEST_SKIP() << "RLIMIT_FSIZE too low";
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  const std::string data = Pattern(6 * kMiB, 23);
  const AlignedBytes src(data);
  for (const bool stable : {false, true}) {
    for (const bool direct : {true, false}) {
      SCOPED_TRACE("stable=" + std::to_string(stable) + " direct_io=" + std::to_string(direct));
      const std::string path = Path(std::string(stable ? "stable" : "copied") + (direct ? "-direct" : "-buffered"));
      WriteOptions options;
      options.direct_io = direct;
      options.buffer_bytes = kMiB;
      Result<std::unique_ptr<WritableFile>> file = fs_->NewWritableFile(path, options);
      ASSERT_TRUE(file.ok());
      rlimit limit = old_limit;
      limit.rlim_cur = kLimit;
      ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limit), 0);
      std::vector<Status> errors;
      auto lift_limit = [&] { ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old_limit), 0); };
      // Stable pieces come from aligned memory (queued in place), copied ones from an odd address.
      for (size_t at = 0; at < data.size(); at += kMiB) {
        const uint64_t before = (*file)->size();
        Status st = stable ? (*file)->AppendStable(src.data + at, kMiB) : (*file)->Append(data.data() + at, kMiB);
        if (!st.ok()) {
          EXPECT_EQ((*file)->size(), before);  // a failed Append takes nothing
          errors.push_back(st);
          lift_limit();
          st = stable ? (*file)->AppendStable(src.data + at, kMiB) : (*file)->Append(data.data() + at, kMiB);
          ASSERT_TRUE(st.ok()) << st.ToString();
        }
      }
      Status synced = (*file)->Sync();
      if (!synced.ok()) {
        errors.push_back(synced);
        lift_limit();
        synced = (*file)->Sync();
      }
      lift_limit();
      ASSERT_TRUE(synced.ok()) << synced.ToString();
      ASSERT_EQ(errors.size(), 1u);
      EXPECT_EQ(errors[0].code(), StatusCode::kIOError);
      EXPECT_EQ(errors[0].message(), "write(" + path + "): File too large");
      ASSERT_TRUE((*file)->Close().ok());
      ExpectSameBytes(*ReadFileToString(fs_, path), data);
    }
  }
  std::signal(SIGXFSZ, old_handler);
}

// Destroying a file with writes still queued waits for the one in progress and drops the rest;
// the caller's memory may go right after.
TEST_F(FileSystemTest, DestroyingAFileWithQueuedWritesAbandonsThem) {
  const std::string data = Pattern(8 * kMiB, 24);
  const std::string path = Path("abandoned");
  {
    const AlignedBytes src(data);
    WriteOptions options;
    options.buffer_bytes = kMiB;
    Result<std::unique_ptr<WritableFile>> file = fs_->NewWritableFile(path, options);
    ASSERT_TRUE(file.ok());
    for (size_t at = 0; at < data.size(); at += kMiB) ASSERT_TRUE((*file)->AppendStable(src.data + at, kMiB).ok());
    file->reset();
  }
  const uint64_t size = *fs_->FileSize(path);
  EXPECT_LE(size, data.size());
  EXPECT_EQ(size % kMiB, 0u);
  ExpectSameBytes(*ReadFileToString(fs_, path), data.substr(0, size));
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

TEST_F(FileSystemTest, AppendStableGoesThroughTheFaults) {
  auto fault = FaultFs("short_writes=1,enospc_after=" + std::to_string(5 * kMiB));
  ASSERT_NE(fault, nullptr);
  const std::string data = Pattern(6 * kMiB, 25);
  const AlignedBytes src(data);
  const std::string path = Path("stable");
  Result<std::unique_ptr<WritableFile>> file = fault->NewWritableFile(path);
  ASSERT_TRUE(file.ok());
  ASSERT_TRUE((*file)->AppendStable(src.data, 4 * kMiB).ok());
  EXPECT_EQ(fault->injected_faults(), 22u);  // 4 MiB halved down to 1 byte
  const Status st = (*file)->AppendStable(src.data + 4 * kMiB, 2 * kMiB);
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(st.message(), "write(" + path + "): No space left on device");
  EXPECT_EQ((*file)->size(), 4 * kMiB);
  ASSERT_TRUE((*file)->Close().ok());
  ExpectSameBytes(*ReadFileToString(fs_, path), data.substr(0, 4 * kMiB));
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
