// POSIX errors converted to Status, once, at the edge (NCCL's checks.h style).
#pragma once

#include <cerrno>
#include <cstring>
#include <string>

#include "core/status.h"

namespace memento {

// Status for a failed POSIX call: `what` names the call and its object, errno says why.
inline Status PosixError(const std::string& what, int err = errno) {
  std::string msg = what + ": " + std::strerror(err);
  switch (err) {
    case ENOENT: return NotFound(msg);
    case EEXIST: return AlreadyExists(msg);
    case EACCES:
    case EPERM: return PermissionDenied(msg);
    case ENOSPC:
    case ENOMEM:
    case EDQUOT: return ResourceExhausted(msg);
    case EAGAIN:
    case EINTR: return IOError(msg, /*retryable=*/true);
    case ECONNREFUSED:
    case ECONNRESET:
    case EPIPE: return Unavailable(msg);
    default: return IOError(msg);
  }
}

}  // namespace memento

// Evaluates a POSIX call returning -1 on failure; on failure returns a Status naming `what`.
#define MEMENTO_POSIX_CHECK(call, what)                              \
  do {                                                               \
    if ((call) == -1) return ::memento::PosixError(what);            \
  } while (0)
