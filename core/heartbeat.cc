// Heartbeat datagrams: format, sender and receiver.
#include "core/heartbeat.h"

#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <sstream>

#include "core/posix_error.h"

namespace memento {
namespace {

constexpr const char* kMagic = "MHB1";
constexpr BeatPhase kPhases[] = {BeatPhase::kConnected, BeatPhase::kRegistered, BeatPhase::kReady,
                                 BeatPhase::kRestored,  BeatPhase::kStep,       BeatPhase::kWaiting,
                                 BeatPhase::kClosed};

}  // namespace

const char* BeatPhaseName(BeatPhase p) {
  switch (p) {
    case BeatPhase::kConnected: return "connected";
    case BeatPhase::kRegistered: return "registered";
    case BeatPhase::kReady: return "ready";
    case BeatPhase::kRestored: return "restored";
    case BeatPhase::kStep: return "step";
    case BeatPhase::kWaiting: return "waiting";
    case BeatPhase::kClosed: return "closed";
  }
  return "?";
}

std::string FormatBeat(const Beat& b) {
  return std::string(kMagic) + " " + b.job + " " + std::to_string(b.rank) + " " + std::to_string(b.pid) + " " +
         BeatPhaseName(b.phase) + " " + std::to_string(b.step) + " " + b.detail;
}

Result<Beat> ParseBeat(const std::string& text) {
  std::istringstream in(text);
  std::string magic, phase;
  Beat b;
  if (!(in >> magic) || magic != kMagic) return InvalidArgument("not a memento heartbeat (no MHB1 prefix)");
  if (!(in >> b.job >> b.rank >> b.pid >> phase >> b.step)) {
    return InvalidArgument("malformed heartbeat '" + text + "': expected job, rank, pid, phase and step");
  }
  bool known = false;
  for (BeatPhase p : kPhases) {
    if (phase == BeatPhaseName(p)) {
      b.phase = p;
      known = true;
    }
  }
  if (!known) return InvalidArgument("heartbeat with unknown phase '" + phase + "'");
  if (b.rank < 0) return InvalidArgument("heartbeat with negative rank " + std::to_string(b.rank));
  std::getline(in, b.detail);
  if (!b.detail.empty() && b.detail[0] == ' ') b.detail.erase(0, 1);
  return b;
}

Result<std::unique_ptr<HeartbeatSender>> HeartbeatSender::Create(const std::string& address, std::string job,
                                                                  int32_t rank) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return InvalidArgument("heartbeat address '" + address + "' is not host:port");
  }
  const std::string host = address.substr(0, colon);
  const std::string port = address.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0) {
    return Unavailable("heartbeat address '" + address + "': " + ::gai_strerror(rc));
  }
  int fd = ::socket(res->ai_family, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    ::freeaddrinfo(res);
    return PosixError("socket() for heartbeats");
  }
  const int rc = ::connect(fd, res->ai_addr, res->ai_addrlen);
  ::freeaddrinfo(res);
  if (rc != 0) {
    Status st = PosixError("connecting the heartbeat socket to " + address);
    ::close(fd);
    return st;
  }
  return std::unique_ptr<HeartbeatSender>(new HeartbeatSender(fd, std::move(job), rank));
}

HeartbeatSender::~HeartbeatSender() { ::close(fd_); }

void HeartbeatSender::Send(BeatPhase phase, int64_t step, const std::string& detail) {
  Beat b;
  b.job = job_;
  b.rank = rank_;
  b.pid = ::getpid();
  b.phase = phase;
  b.step = step;
  b.detail = detail;
  const std::string text = FormatBeat(b);
  (void)::send(fd_, text.data(), text.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
}

HeartbeatSender::KeepAlive::KeepAlive(HeartbeatSender* sender, int64_t step) : sender_(sender) {
  if (sender_ == nullptr) return;
  thread_ = std::thread([this, step] {
    std::unique_lock<std::mutex> lock(mu_);
    while (!cv_.wait_for(lock, std::chrono::milliseconds(500), [this] { return stop_; })) {
      sender_->Send(BeatPhase::kWaiting, step);
    }
  });
}

HeartbeatSender::KeepAlive::~KeepAlive() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

Result<std::unique_ptr<HeartbeatReceiver>> HeartbeatReceiver::Create() {
  int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return PosixError("socket() for the heartbeat listener");
  int size = 4 << 20;
  (void)::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    Status st = PosixError("binding the heartbeat listener");
    ::close(fd);
    return st;
  }
  socklen_t len = sizeof addr;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    Status st = PosixError("getsockname() of the heartbeat listener");
    ::close(fd);
    return st;
  }
  return std::unique_ptr<HeartbeatReceiver>(new HeartbeatReceiver(fd, ntohs(addr.sin_port)));
}

HeartbeatReceiver::~HeartbeatReceiver() { ::close(fd_); }

Result<Beat> HeartbeatReceiver::Receive(int timeout_ms) {
  pollfd p{fd_, POLLIN, 0};
  int rc = ::poll(&p, 1, timeout_ms);
  if (rc < 0 && errno != EINTR) return PosixError("poll() on the heartbeat listener");
  if (rc <= 0) return NotFound("no heartbeat within " + std::to_string(timeout_ms) + " ms");
  char buf[2048];
  ssize_t n = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
  if (n < 0) {
    if (errno == EAGAIN || errno == EINTR) return NotFound("no heartbeat");
    return PosixError("recv() on the heartbeat listener");
  }
  return ParseBeat(std::string(buf, static_cast<size_t>(n)));
}

}  // namespace memento
