// Message framing on a stream socket: a 4-byte little-endian length, then a serialized Protobuf.
// Each call is blocking; a socket is used by one thread at a time.
#pragma once

#include <cstdint>

#include <google/protobuf/message_lite.h>

#include "core/status.h"

namespace memento {

// Largest frame accepted from a peer (bytes); bigger lengths are refused as malformed.
inline constexpr uint32_t kMaxFrameBytes = 64u << 20;

Status SendFrame(int fd, const google::protobuf::MessageLite& message);
// Unavailable when the peer closed the connection; InvalidArgument for a malformed frame.
Status RecvFrame(int fd, google::protobuf::MessageLite* message);

}  // namespace memento
