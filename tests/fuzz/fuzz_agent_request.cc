// libFuzzer target: what a connected client sends the agent. The bytes go through a socket pair
// into RecvFrame (proto/wire.h) as the agent's connection thread reads them, one Request frame
// after another; each request runs through the checks the agent applies before touching its state
// (agent/node_state.h: CheckHello, LayOutSlot), in the order SocketServer::Serve allows (Hello
// first). The same bytes are also read as Reply frames, as the client reads them.
// Invariants: a frame read is a message that survives a serialize/parse round trip; an accepted
// Hello has 0 <= rank < world_size and local_rank >= 0; an accepted registration has unique
// non-empty names, buffers of exactly local_numel x width bytes (no overflow), and a layout whose
// tensors and blobs are 4 KiB-aligned, inside the slot and disjoint, which CheckRankLayout accepts.
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "agent/catalog.h"
#include "agent/node_state.h"
#include "core/dtype.h"
#include "core/shard.h"
#include "proto/memento.pb.h"
#include "proto/shard_convert.h"
#include "proto/version.h"
#include "proto/wire.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

constexpr size_t kMaxInput = 64 << 10;  // fits a socket buffer: the writer never blocks

const memento::AgentOptions& Options() {
  static const memento::AgentOptions* options = [] {
    auto* o = new memento::AgentOptions();
    o->job_id = "fuzz";
    o->job_token = "token";
    return o;
  }();
  return *options;
}

// Every frame RecvFrame reads from `bytes`, until it reports an error or the end.
template <typename Message>
std::vector<Message> Frames(std::string_view bytes) {
  std::vector<Message> out;
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return out;
  const int buffer = 4 * kMaxInput;
  ::setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &buffer, sizeof buffer);
  ::fcntl(fds[0], F_SETFL, O_NONBLOCK);
  size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = ::send(fds[0], bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  ::shutdown(fds[0], SHUT_WR);
  for (;;) {
    Message m;
    if (!memento::RecvFrame(fds[1], &m).ok()) break;
    memento::fuzz::CheckRoundTrip(m);
    out.push_back(std::move(m));
  }
  ::close(fds[0]);
  ::close(fds[1]);
  return out;
}

void CheckLayout(const memento::Session& session, const memento::proto::RegisterRequest& req,
                 const memento::proto::RankRecord& rec) {
  MEMENTO_FUZZ_CHECK(rec.rank() == session.rank && rec.world_size() == session.world_size, "rank record");
  MEMENTO_FUZZ_CHECK(rec.tensors_size() == req.tensors_size() && rec.blobs_size() == req.blobs_size(),
                     "the layout drops or adds entries");
  MEMENTO_FUZZ_CHECK(rec.slot_bytes() >= 4096 && rec.slot_bytes() % 4096 == 0, "slot of " + std::to_string(rec.slot_bytes()));
  std::set<std::string> names;
  std::vector<std::pair<uint64_t, uint64_t>> regions;  // [begin, end) in the slot
  for (const auto& t : rec.tensors()) {
    MEMENTO_FUZZ_CHECK(!t.name().empty() && names.insert(t.name()).second, "tensor name '" + t.name() + "'");
    memento::Result<memento::DType> dtype = memento::DTypeFromInt(t.dtype());
    memento::Result<memento::ShardSpec> spec = memento::FromProto(t.spec());
    MEMENTO_FUZZ_CHECK(dtype.ok() && spec.ok() && spec->Validate().ok(), "tensor '" + t.name() + "' spec");
    uint64_t need = 0;
    MEMENTO_FUZZ_CHECK(!__builtin_mul_overflow(static_cast<uint64_t>(spec->local_numel), memento::DTypeSize(*dtype), &need) &&
                           need == t.bytes(),
                       "tensor '" + t.name() + "': " + std::to_string(t.bytes()) + " bytes for " +
                           std::to_string(spec->local_numel) + " elements of " + std::string(memento::DTypeName(*dtype)));
    MEMENTO_FUZZ_CHECK(t.slot_offset() % 4096 == 0 && t.slot_offset() <= rec.slot_bytes() &&
                           t.bytes() <= rec.slot_bytes() - t.slot_offset(),
                       "tensor '" + t.name() + "' outside the slot");
    regions.emplace_back(t.slot_offset(), t.slot_offset() + t.bytes());
  }
  for (const auto& b : rec.blobs()) {
    MEMENTO_FUZZ_CHECK(!b.name().empty() && names.insert(b.name()).second, "blob name '" + b.name() + "'");
    MEMENTO_FUZZ_CHECK(b.capacity() > 0 && b.slot_offset() % 4096 == 0 && b.slot_offset() <= rec.slot_bytes() &&
                           rec.slot_bytes() - b.slot_offset() >= 8 && b.capacity() <= rec.slot_bytes() - b.slot_offset() - 8,
                       "blob '" + b.name() + "' outside the slot");
    regions.emplace_back(b.slot_offset(), b.slot_offset() + 8 + b.capacity());
  }
  std::sort(regions.begin(), regions.end());
  for (size_t i = 1; i < regions.size(); ++i) {
    MEMENTO_FUZZ_CHECK(regions[i - 1].second <= regions[i].first, "two regions of the slot overlap");
  }
  memento::Status valid = memento::CheckRankLayout(rec);
  MEMENTO_FUZZ_CHECK(valid.ok(), "CheckRankLayout refuses a registration's layout: " + valid.ToString());
}

void Serve(const std::vector<memento::proto::Request>& requests) {
  memento::Session session;
  for (const memento::proto::Request& req : requests) {
    if (!session.hello_done && req.body_case() != memento::proto::Request::kHello) return;  // the server closes
    if (req.body_case() == memento::proto::Request::kHello) {
      const memento::proto::Hello& h = req.hello();
      if (!memento::CheckHello(h, Options()).ok()) {
        if (!session.hello_done) return;
        continue;
      }
      MEMENTO_FUZZ_CHECK(h.protocol_version() == memento::kAgentProtocolVersion && h.job_id() == Options().job_id &&
                             h.job_token() == Options().job_token,
                         "hello of another job or protocol accepted");
      MEMENTO_FUZZ_CHECK(h.world_size() > 0 && h.rank() >= 0 && h.rank() < h.world_size() && h.local_rank() >= 0,
                         "hello of rank " + std::to_string(h.rank()) + " of " + std::to_string(h.world_size()));
      session.hello_done = true;
      session.rank = h.rank();
      session.local_rank = h.local_rank();
      session.world_size = h.world_size();
    } else if (req.body_case() == memento::proto::Request::kRegisterRequest) {
      memento::Result<memento::proto::RankRecord> rec = memento::LayOutSlot(session, req.register_request());
      if (rec.ok()) CheckLayout(session, req.register_request(), *rec);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > kMaxInput) return 0;
  const std::string_view bytes = memento::fuzz::Bytes(data, size);
  Serve(Frames<memento::proto::Request>(bytes));
  (void)Frames<memento::proto::Reply>(bytes);
  return 0;
}
