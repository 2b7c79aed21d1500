// RocksDB statuses converted to memento Status, once, at the edge.
#pragma once

#include <string>

#include <rocksdb/status.h>

#include "core/status.h"

namespace memento {

inline Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::Ok();
  std::string msg = what + ": " + s.ToString();
  if (s.IsNotFound()) return NotFound(msg);
  if (s.IsCorruption()) return DataLoss(msg);
  if (s.IsNoSpace()) return ResourceExhausted(msg);
  if (s.IsIOError()) return IOError(msg);
  if (s.IsBusy() || s.IsTryAgain()) return Unavailable(msg);
  if (s.IsInvalidArgument()) return InvalidArgument(msg);
  return Internal(msg);
}

}  // namespace memento
