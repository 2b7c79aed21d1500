// Bad input to a real agent: each refused with a clear error, and the agent keeps serving the
// other ranks.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "integration/harness.h"
#include "proto/memento.pb.h"
#include "proto/version.h"
#include "proto/wire.h"

namespace memento::testing {
namespace {

class AgentInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cluster_ = std::make_unique<AgentCluster>(UniqueJob("input"), 1, std::vector<std::string>{"--token", "s3cret",
                                                                                               "--memory-budget", "1M"});
    cluster_->Start();
  }
  // After each bad call, a good rank still captures and restores.
  void ExpectAgentStillServes() {
    auto c = cluster_->Connect(0, 1, 0, 0, "s3cret");
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    RankState s(1, 100);
    ASSERT_TRUE(s.Register(c->get()).ok());
    s.Fill(0, ++step_);
    ASSERT_TRUE((*c)->Snapshot(step_).ok());
    ASSERT_TRUE((*c)->WaitUntilSafeToUpdate().ok());
    ASSERT_TRUE(WaitGloballyComplete(c->get(), step_));
    s.Clear();
    auto r = (*c)->Restore();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(s.Matches(0, step_));
  }
  // A plain socket to the agent, for messages the client library would never send; -1 on failure.
  int RawConnect() {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, cluster_->Socket(0).c_str(), sizeof(addr.sun_path) - 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      ::close(fd);
      return -1;
    }
    return fd;
  }
  Status RegisterOne(const std::string& name, void* data, size_t bytes, DType dt, const ShardSpec& spec) {
    auto c = cluster_->Connect(0, 1, 0, 0, "s3cret");
    if (!c.ok()) return c.status();
    Status st = (*c)->RegisterTensor(name, data, bytes, dt, spec);
    if (!st.ok()) return st;
    return (*c)->FinishRegistration();
  }

  std::unique_ptr<AgentCluster> cluster_;
  int64_t step_ = 0;
};

TEST_F(AgentInputTest, SocketAndSlotsAreOwnerOnly) {
  struct stat st {};
  ASSERT_EQ(::stat(cluster_->Socket(0).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ExpectAgentStillServes();
  for (int k = 0; k < 2; ++k) {
    ASSERT_EQ(::stat(("/dev/shm" + cluster_->SlotName(0, 0, k)).c_str(), &st), 0) << k;
    EXPECT_EQ(st.st_mode & 0777, 0600u);
  }
}

TEST_F(AgentInputTest, WrongJobIsRefused) {
  auto c = cluster_->Connect(0, 1, 0, 0, "s3cret", "someone-else");
  EXPECT_EQ(c.status().code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(c.status().message(),
            "rank 0: client of job 'someone-else' refused by the agent of job '" + cluster_->job() + "'");
  ExpectAgentStillServes();
}

TEST_F(AgentInputTest, WrongTokenIsRefused) {
  auto c = cluster_->Connect(0, 1, 0, 0, "guess");
  EXPECT_EQ(c.status().code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(c.status().message(), "rank 0: wrong job token for job '" + cluster_->job() + "'");
  ExpectAgentStillServes();
}

TEST_F(AgentInputTest, OtherProtocolVersionNamesBoth) {
  int fd = RawConnect();
  ASSERT_GE(fd, 0);
  proto::Request req;
  req.mutable_hello()->set_protocol_version(99);
  req.mutable_hello()->set_job_id(cluster_->job());
  req.mutable_hello()->set_library_version("9.9.9");
  ASSERT_TRUE(SendFrame(fd, req).ok());
  proto::Reply reply;
  ASSERT_TRUE(RecvFrame(fd, &reply).ok());
  ::close(fd);
  ASSERT_TRUE(reply.has_error());
  EXPECT_EQ(reply.error().code(), static_cast<int>(StatusCode::kFailedPrecondition));
  EXPECT_EQ(reply.error().message(),
            "rank 0: client speaks agent protocol version 99 but this agent speaks version 2 (client library 9.9.9, "
            "agent 0.1.0)");
  ExpectAgentStillServes();
}

TEST_F(AgentInputTest, MalformedFrameClosesOnlyThatConnection) {
  int fd = RawConnect();
  ASSERT_GE(fd, 0);
  const unsigned char garbage[] = {0xff, 0xff, 0xff, 0x7f, 1, 2, 3};
  ASSERT_EQ(::send(fd, garbage, sizeof garbage, 0), static_cast<ssize_t>(sizeof garbage));
  char b;
  EXPECT_LE(::recv(fd, &b, 1, 0), 0);  // the agent closed it (EOF, or a reset: unread bytes were pending)
  ::close(fd);
  ExpectAgentStillServes();
  EXPECT_TRUE(cluster_->LogHas("exceeds the limit of 67108864")) << cluster_->Log();
}

// Found with tests/fuzz/fuzz_agent_request.cc: local_numel x width wrapped around 64 bits, so a
// tensor of 2^62 F32 elements was accepted with a buffer (and a place in the slot) of 0 bytes; and
// a blob's capacity near 2^64 wrapped the slot's offsets around.
TEST_F(AgentInputTest, SizesThatWrapAround64BitsAreRefused) {
  auto registration_reply = [&](const proto::RegisterRequest& registration) {
    int fd = RawConnect();
    EXPECT_GE(fd, 0);
    proto::Request hello;
    hello.mutable_hello()->set_protocol_version(kAgentProtocolVersion);
    hello.mutable_hello()->set_job_id(cluster_->job());
    hello.mutable_hello()->set_job_token("s3cret");
    hello.mutable_hello()->set_world_size(1);
    proto::Request reg;
    *reg.mutable_register_request() = registration;
    proto::Reply reply;
    EXPECT_TRUE(SendFrame(fd, hello).ok() && RecvFrame(fd, &reply).ok() && !reply.has_error()) << reply.DebugString();
    EXPECT_TRUE(SendFrame(fd, reg).ok() && RecvFrame(fd, &reply).ok());
    ::close(fd);
    return reply.error();
  };
  proto::RegisterRequest huge;
  proto::TensorRecord* t = huge.add_tensors();
  t->set_name("w");
  t->set_dtype(static_cast<int32_t>(DType::kF32));
  t->mutable_spec()->add_global_shape(int64_t{1} << 62);
  t->mutable_spec()->set_local_numel(int64_t{1} << 62);
  proto::FragmentProto* f = t->mutable_spec()->add_fragments();
  f->set_kind(1);
  f->set_flat_length(int64_t{1} << 62);
  proto::ErrorReply e = registration_reply(huge);
  EXPECT_EQ(e.code(), static_cast<int>(StatusCode::kInvalidArgument));
  EXPECT_EQ(e.message(), "rank 0: tensor 'w': 4611686018427387904 elements of F32 are more bytes than 64 bits can count");
  proto::RegisterRequest blob;
  blob.add_blobs()->set_name("rng");
  blob.mutable_blobs(0)->set_capacity(~uint64_t{0} - 7);
  e = registration_reply(blob);
  EXPECT_EQ(e.code(), static_cast<int>(StatusCode::kInvalidArgument));
  EXPECT_EQ(e.message(), "rank 0: blob 'rng': the slot would exceed 4611686018427387904 bytes");
  ExpectAgentStillServes();
}

TEST_F(AgentInputTest, UnknownDTypeIsRefused) {
  float x[4];
  auto c = cluster_->Connect(0, 1, 0, 0, "s3cret");
  ASSERT_TRUE(c.ok());
  Status st = (*c)->RegisterTensor("w", x, static_cast<DType>(42), WholeTensor({4}));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "tensor 'w' has unknown dtype code 42");
  ExpectAgentStillServes();
}

TEST_F(AgentInputTest, BufferSizeNotMatchingTheSpecIsRefused) {
  float x[4];
  Status st = RegisterOne("w", x, 12, DType::kF32, WholeTensor({4}));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "rank 0: tensor 'w': buffer of 12 bytes does not match its spec: 4 elements of F32 need 16 bytes");
  ExpectAgentStillServes();
}

TEST_F(AgentInputTest, OverlappingFragmentsAreRefused) {
  ShardSpec spec;
  spec.global_shape = {8};
  Fragment a;
  a.kind = Fragment::Kind::kFlat;
  a.flat_begin = 0;
  a.flat_length = 4;
  Fragment b = a;
  b.local_offset = 4;
  b.flat_begin = 2;
  spec.fragments = {a, b};
  spec.local_numel = 8;
  float x[8];
  Status st = RegisterOne("w", x, sizeof x, DType::kF32, spec);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("rank 0: tensor 'w': fragment 1 overlaps fragment 0"), std::string::npos) << st.message();
  ExpectAgentStillServes();
}

TEST_F(AgentInputTest, DuplicateNamesAreRefused) {
  auto c = cluster_->Connect(0, 1, 0, 0, "s3cret");
  ASSERT_TRUE(c.ok());
  float x[4], y[4];
  ASSERT_TRUE((*c)->RegisterTensor("w", x, DType::kF32, WholeTensor({4})).ok());
  ASSERT_TRUE((*c)->RegisterTensor("w", y, DType::kF32, WholeTensor({4})).ok());
  Status st = (*c)->FinishRegistration();
  EXPECT_EQ(st.code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(st.message(), "rank 0: tensor 'w' is registered twice");
  ExpectAgentStillServes();
}

TEST_F(AgentInputTest, MemoryBudgetSaysWhatWasNeededAndWhatWasFree) {
  std::vector<float> big(300 * 1024);  // 1.2 MB per slot, 2 slots, budget 1 MiB
  Status st = RegisterOne("big", big.data(), big.size() * 4, DType::kF32, WholeTensor({static_cast<int64_t>(big.size())}));
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(st.message(),
            "rank 0: needs 3 slots of 1.2 MiB = 3.5 MiB, but the agent's memory budget has 1.0 MiB free (budget 1.0 "
            "MiB, 0 B in use)");
  ExpectAgentStillServes();
}

}  // namespace
}  // namespace memento::testing
