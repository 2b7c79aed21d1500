// Framing over POSIX sockets; errors converted once through core/posix_error.h.
#include "proto/wire.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <string>

#include "core/posix_error.h"

namespace memento {
namespace {

Status WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return PosixError("send on agent socket");
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

Status ReadAll(int fd, char* p, size_t n, bool at_frame_start) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::recv(fd, p + got, n - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return PosixError("recv on agent socket");
    }
    if (r == 0) {
      return Unavailable(at_frame_start && got == 0 ? "peer closed the connection"
                                                    : "peer closed the connection in the middle of a message");
    }
    got += static_cast<size_t>(r);
  }
  return Status::Ok();
}

}  // namespace

Status SendFrame(int fd, const google::protobuf::MessageLite& message) {
  std::string body;
  if (!message.SerializeToString(&body)) return Internal("cannot serialize " + message.GetTypeName());
  if (body.size() > kMaxFrameBytes) {
    return InvalidArgument(message.GetTypeName() + " of " + std::to_string(body.size()) +
                           " bytes exceeds the frame limit of " + std::to_string(kMaxFrameBytes));
  }
  uint32_t n = static_cast<uint32_t>(body.size());
  char header[4] = {static_cast<char>(n & 0xff), static_cast<char>((n >> 8) & 0xff),
                    static_cast<char>((n >> 16) & 0xff), static_cast<char>((n >> 24) & 0xff)};
  std::string frame(header, 4);
  frame += body;
  return WriteAll(fd, frame.data(), frame.size());
}

Status RecvFrame(int fd, google::protobuf::MessageLite* message) {
  unsigned char header[4];
  MEMENTO_RETURN_IF_ERROR(ReadAll(fd, reinterpret_cast<char*>(header), 4, true));
  uint32_t n = header[0] | (header[1] << 8) | (header[2] << 16) | (static_cast<uint32_t>(header[3]) << 24);
  if (n > kMaxFrameBytes) {
    return InvalidArgument("frame of " + std::to_string(n) + " bytes exceeds the limit of " +
                           std::to_string(kMaxFrameBytes));
  }
  // The body grows as its bytes arrive (doubling from 64 KiB): a peer that declares a large frame
  // and sends little of it costs what it sent, not the size it declared.
  std::string body;
  size_t got = 0;
  while (got < n) {
    const size_t want = std::min<size_t>(n, std::max<size_t>(2 * got, size_t{64} << 10));
    body.resize(want);
    MEMENTO_RETURN_IF_ERROR(ReadAll(fd, body.data() + got, want - got, false));
    got = want;
  }
  if (!message->ParseFromString(body)) return InvalidArgument("malformed " + message->GetTypeName() + " frame");
  return Status::Ok();
}

}  // namespace memento
