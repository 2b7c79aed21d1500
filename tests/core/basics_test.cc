// Status, dtypes, CRC-64, shared memory and message framing.
#include <gtest/gtest.h>

#include <vector>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "core/crc.h"
#include "core/dtype.h"
#include "core/env.h"
#include "core/shared_memory.h"
#include "core/status.h"
#include "proto/memento.pb.h"
#include "proto/wire.h"

namespace memento {
namespace {

Result<int> Half(int x) {
  if (x % 2) return InvalidArgument("odd " + std::to_string(x));
  return x / 2;
}

Status Quarter(int x, int* out) {
  MEMENTO_ASSIGN_OR_RETURN(int h, Half(x));
  MEMENTO_ASSIGN_OR_RETURN(*out, Half(h));
  return Status::Ok();
}

TEST(StatusTest, CodesMessagesAndPropagation) {
  int q = 0;
  EXPECT_TRUE(Quarter(8, &q).ok());
  EXPECT_EQ(q, 2);
  Status st = Quarter(6, &q);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.ToString(), "InvalidArgument: odd 3");
  EXPECT_EQ(st.WithContext("step 4").message(), "step 4: odd 3");
  EXPECT_TRUE(Unavailable("x").retryable());
  EXPECT_FALSE(DataLoss("x").retryable());
  Result<int> bad(Status::Ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInternal);
}

TEST(DTypeTest, SizesNamesAndParsing) {
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF8E5M2), 1u);
  EXPECT_EQ(DTypeSize(DType::kBool), 1u);
  EXPECT_EQ(DTypeSize(static_cast<DType>(99)), 0u);
  EXPECT_EQ(DTypeName(DType::kF8E4M3), "F8_E4M3");
  EXPECT_EQ(*ParseDType("bfloat16"), DType::kBF16);
  EXPECT_EQ(*ParseDType("F32"), DType::kF32);
  EXPECT_EQ(*ParseDType("fp8_e5m2"), DType::kF8E5M2);
  EXPECT_EQ(ParseDType("complex64").status().message(), "unknown dtype 'complex64'");
  EXPECT_EQ(DTypeFromInt(0).status().message(), "unknown dtype code 0");
  EXPECT_EQ(*DTypeFromInt(11), DType::kBool);
}

TEST(CrcTest, KnownValueAndIncremental) {
  const char* s = "123456789";
  // CRC-64/XZ (ECMA-182 polynomial, reflected, inverted) check value.
  EXPECT_EQ(Crc64(s, 9), 0x995DC9BBDF1939FAull);
  EXPECT_EQ(Crc64(s + 4, 5, Crc64(s, 4)), Crc64(s, 9));
  std::string a(1 << 20, 'x');
  uint64_t before = Crc64(a.data(), a.size());
  a[777] ^= 1;
  EXPECT_NE(Crc64(a.data(), a.size()), before);
}

TEST(SharedMemoryTest, CreateOpenModeAndErrors) {
  const std::string name = "/memento-" + std::string(std::getenv("MEMENTO_TEST_PREFIX") ? std::getenv("MEMENTO_TEST_PREFIX") : "tlocal") +
                           "-shmtest-" + std::to_string(::getpid());
  auto a = SharedMemory::Create(name, 10000);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  struct stat st {};
  ASSERT_EQ(::stat(("/dev/shm" + name).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  std::memcpy((*a)->data(), "hello", 5);
  auto b = SharedMemory::Open(name, 10000, false);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(std::memcmp((*b)->data(), "hello", 5), 0);
  auto wrong = SharedMemory::Open(name, 4096, false);
  EXPECT_EQ(wrong.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(wrong.status().message(), "shared memory " + name + " has 10000 bytes, expected 4096");
  EXPECT_EQ(SharedMemory::Create(name, 10).status().code(), StatusCode::kAlreadyExists);
  ASSERT_TRUE(SharedMemory::Unlink(name).ok());
  EXPECT_FALSE(SharedMemory::Exists(name));
  EXPECT_EQ(SharedMemory::Open(name, 10000, false).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(12), "12 B");
}

TEST(SharedMemoryTest, ResizeKeepsTheBytesBelowBothSizes) {
  const std::string name = "/memento-" + std::string(std::getenv("MEMENTO_TEST_PREFIX") ? std::getenv("MEMENTO_TEST_PREFIX") : "tlocal") +
                           "-shmresize-" + std::to_string(::getpid());
  auto a = SharedMemory::Create(name, 3 * 4096);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  std::vector<uint8_t> pattern(2 * 4096);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(i * 7 + 1);
  std::memcpy((*a)->data(), pattern.data(), pattern.size());
  // Shrinking: the file and the mapping take the new size; the head is kept.
  ASSERT_TRUE((*a)->Resize(2 * 4096).ok());
  EXPECT_EQ((*a)->size(), 2u * 4096);
  struct stat st {};
  ASSERT_EQ(::stat(("/dev/shm" + name).c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 2 * 4096);
  EXPECT_EQ(std::memcmp((*a)->data(), pattern.data(), pattern.size()), 0);
  // Growing: another process opening it at the new size sees the old bytes and writable new pages.
  ASSERT_TRUE((*a)->Resize(5 * 4096 + 100).ok());
  auto b = SharedMemory::Open(name, 5 * 4096 + 100, /*writable=*/true);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(std::memcmp((*b)->data(), pattern.data(), pattern.size()), 0);
  (*b)->data()[5 * 4096 + 99] = 0x5a;
  EXPECT_EQ((*a)->data()[5 * 4096 + 99], 0x5a);
  // A segment whose name is gone cannot be resized, and stays as it was.
  ASSERT_TRUE(SharedMemory::Unlink(name).ok());
  Status gone = (*a)->Resize(4096);
  EXPECT_EQ(gone.code(), StatusCode::kNotFound);
  EXPECT_EQ(gone.message(), "shm_open(" + name + "): No such file or directory");
  EXPECT_EQ((*a)->size(), 5u * 4096 + 100);
  EXPECT_EQ((*a)->data()[5 * 4096 + 99], 0x5a);
}

TEST(EnvTest, NodePattern) {
  EXPECT_EQ(ExpandNodePattern("/tmp/a-%n.sock", 3), "/tmp/a-3.sock");
  EXPECT_EQ(ExpandNodePattern("%n/%n", 10), "10/10");
  EXPECT_EQ(ExpandNodePattern("plain", 1), "plain");
}

TEST(WireTest, FramesRoundTripAndMalformedInputIsRefused) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  proto::Request req;
  req.mutable_begin_capture()->set_step(42);
  ASSERT_TRUE(SendFrame(sv[0], req).ok());
  proto::Request got;
  ASSERT_TRUE(RecvFrame(sv[1], &got).ok());
  EXPECT_EQ(got.begin_capture().step(), 42);
  // A frame larger than the first read (64 KiB), sent by a thread while the body grows.
  proto::Request large;
  std::string token(3 * (1 << 20) + 17, '\0');
  for (size_t i = 0; i < token.size(); ++i) token[i] = static_cast<char>('a' + i % 26);
  large.mutable_hello()->set_job_token(token);
  std::thread sender([&] { EXPECT_TRUE(SendFrame(sv[0], large).ok()); });
  ASSERT_TRUE(RecvFrame(sv[1], &got).ok());
  sender.join();
  EXPECT_EQ(got.hello().job_token(), token);
  // A length over the limit.
  const unsigned char big[4] = {0, 0, 0, 0x10};
  ASSERT_EQ(::write(sv[0], big, 4), 4);
  Status st = RecvFrame(sv[1], &got);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "frame of 268435456 bytes exceeds the limit of 67108864");
  // Bytes that are not a Request.
  const unsigned char junk[7] = {3, 0, 0, 0, 0xff, 0xff, 0xff};
  ASSERT_EQ(::write(sv[0], junk, 7), 7);
  st = RecvFrame(sv[1], &got);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "malformed memento.proto.Request frame");
  // The peer goes away mid-frame.
  const unsigned char part[6] = {10, 0, 0, 0, 1, 2};
  ASSERT_EQ(::write(sv[0], part, 6), 6);
  ::close(sv[0]);
  st = RecvFrame(sv[1], &got);
  ASSERT_EQ(st.code(), StatusCode::kUnavailable) << st.message();
  EXPECT_EQ(st.message(), "peer closed the connection in the middle of a message");
  ::close(sv[1]);
  // A frame that declares 60 MiB and stops after 100 KiB (past the first read) fails the same way.
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  std::thread partial([&] {
    const uint32_t n = 60u << 20;
    const unsigned char header[4] = {static_cast<unsigned char>(n), static_cast<unsigned char>(n >> 8),
                                     static_cast<unsigned char>(n >> 16), static_cast<unsigned char>(n >> 24)};
    EXPECT_EQ(::write(sv[0], header, 4), 4);
    const std::string some(100 << 10, 'x');
    EXPECT_EQ(::write(sv[0], some.data(), some.size()), static_cast<ssize_t>(some.size()));
    ::close(sv[0]);
  });
  st = RecvFrame(sv[1], &got);
  partial.join();
  EXPECT_EQ(st.code(), StatusCode::kUnavailable);
  EXPECT_EQ(st.message(), "peer closed the connection in the middle of a message");
  ::close(sv[1]);
}

}  // namespace
}  // namespace memento
