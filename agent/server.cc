// SocketServer: framing in proto/wire.h, dispatch to NodeState.
#include "agent/server.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "core/log.h"
#include "core/posix_error.h"
#include "proto/wire.h"

namespace memento {
namespace {

void SetError(proto::Reply* reply, const Status& st) {
  reply->mutable_error()->set_code(static_cast<int>(st.code()));
  reply->mutable_error()->set_message(st.message());
  reply->mutable_error()->set_retryable(st.retryable());
}

template <typename T, typename Setter>
void Answer(proto::Reply* reply, Result<T> r, Setter set) {
  if (r.ok()) {
    set(std::move(r).value());
  } else {
    SetError(reply, r.status());
  }
}

}  // namespace

SocketServer::~SocketServer() { Stop(); }

Status SocketServer::Start() {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path_.size() >= sizeof(addr.sun_path)) {
    return InvalidArgument("socket path '" + path_ + "' is longer than " + std::to_string(sizeof(addr.sun_path) - 1) +
                           " bytes");
  }
  std::strncpy(addr.sun_path, path_.c_str(), sizeof(addr.sun_path) - 1);
  ::unlink(path_.c_str());
  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  MEMENTO_POSIX_CHECK(listen_fd_, "socket()");
  // Bind under a restrictive umask so the socket is never reachable by others, even briefly.
  mode_t old = ::umask(0177);
  int rc = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::umask(old);
  MEMENTO_POSIX_CHECK(rc, "bind(" + path_ + ")");
  MEMENTO_POSIX_CHECK(::chmod(path_.c_str(), 0600), "chmod(" + path_ + ")");
  MEMENTO_POSIX_CHECK(::listen(listen_fd_, 128), "listen(" + path_ + ")");
  acceptor_ = std::thread([this] { AcceptLoop(); });
  return Status::Ok();
}

void SocketServer::Stop() {
  if (stopping_.exchange(true)) return;
  if (acceptor_.joinable()) acceptor_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
  std::vector<Worker> workers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    workers.swap(workers_);
  }
  for (auto& w : workers) w.thread.join();
  ::unlink(path_.c_str());
}

void SocketServer::AcceptLoop() {
  while (!stopping_) {
    pollfd p{listen_fd_, POLLIN, 0};
    int rc = ::poll(&p, 1, 100);
    if (rc <= 0) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != ::geteuid()) {
      MEMENTO_LOG(kWarning) << "refused a connection from uid " << cred.uid << " pid " << cred.pid
                            << ": the agent serves only uid " << ::geteuid();
      proto::Reply reply;
      SetError(&reply, PermissionDenied("the agent serves only uid " + std::to_string(::geteuid()) +
                                        "; connection from uid " + std::to_string(cred.uid) + " refused"));
      SendFrame(fd, reply).IgnoreError();
      ::close(fd);
      continue;
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = workers_.begin(); it != workers_.end();) {
      if (it->done->load()) {
        it->thread.join();
        it = workers_.erase(it);
      } else {
        ++it;
      }
    }
    fds_.push_back(fd);
    auto done = std::make_shared<std::atomic<bool>>(false);
    workers_.push_back({std::thread([this, fd, done] {
                          Serve(fd);
                          done->store(true);
                        }),
                        done});
  }
}

void SocketServer::Serve(int fd) {
  Session session;
  for (;;) {
    proto::Request req;
    Status st = RecvFrame(fd, &req);
    if (!st.ok()) {
      if (st.code() != StatusCode::kUnavailable) {
        MEMENTO_LOG(kWarning) << "rank " << session.rank << ": " << st.ToString() << "; closing its connection";
      }
      break;
    }
    proto::Reply reply;
    if (!session.hello_done && req.body_case() != proto::Request::kHello) {
      SetError(&reply, FailedPrecondition("the first message must be Hello"));
    } else {
      switch (req.body_case()) {
        case proto::Request::kHello:
          Answer(&reply, state_->Hello(&session, req.hello()), [&](auto v) { *reply.mutable_hello() = v; });
          break;
        case proto::Request::kRegisterRequest:
          Answer(&reply, state_->Register(&session, req.register_request()),
                 [&](auto v) { *reply.mutable_register_reply() = v; });
          break;
        case proto::Request::kAwaitEpoch:
          Answer(&reply, state_->AwaitEpoch(&session, std::max(0, req.await_epoch().timeout_ms())),
                 [&](auto v) { *reply.mutable_await_epoch() = v; });
          break;
        case proto::Request::kBeginCapture:
          Answer(&reply,
                 state_->BeginCapture(&session, req.begin_capture().step(),
                                      std::max(0, req.begin_capture().timeout_ms())),
                 [&](auto v) { *reply.mutable_begin_capture() = v; });
          break;
        case proto::Request::kCaptured: {
          Status c = state_->Captured(&session, req.captured().step());
          if (c.ok()) {
            reply.mutable_captured();
          } else {
            SetError(&reply, c);
          }
          break;
        }
        case proto::Request::kRestore:
          Answer(&reply, state_->Restore(&session, req.restore().step()),
                 [&](auto v) { *reply.mutable_restore() = v; });
          break;
        case proto::Request::kListVersions:
          *reply.mutable_list_versions() = state_->ListVersions();
          break;
        case proto::Request::kNcclId:
          Answer(&reply, state_->NcclId(&session, req.nccl_id().id(), req.nccl_id().timeout_ms()),
                 [&](auto v) { *reply.mutable_nccl_id() = v; });
          break;
        case proto::Request::BODY_NOT_SET:
          SetError(&reply, InvalidArgument("empty request"));
          break;
      }
    }
    if (reply.has_error()) {
      MEMENTO_LOG(kWarning) << "rank " << session.rank << ": " << StatusCodeName(static_cast<StatusCode>(reply.error().code()))
                            << ": " << reply.error().message();
    }
    if (!SendFrame(fd, reply).ok()) break;
    // A client that failed the handshake is not served further.
    if (!session.hello_done) break;
  }
  std::lock_guard<std::mutex> lock(mu_);
  fds_.erase(std::remove(fds_.begin(), fds_.end(), fd), fds_.end());
  ::close(fd);
}

}  // namespace memento
