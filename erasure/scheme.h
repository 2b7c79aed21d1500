// Scheme: which redundancy protects a group's memory (DESIGN.md §5), as named on the command line
// and in the catalog: "none", "replicate:<r>", "xor", "rs:<m>". A plain value type.
#pragma once

#include <string>
#include <string_view>

#include "core/status.h"

namespace memento {

struct Scheme {
  enum class Kind { kNone, kReplicate, kXor, kReedSolomon };

  // The most parity segments (or extra copies) a scheme may ask for: rs:32, replicate:33. A
  // sanity bound on a typo'd option; real groups use 1 to 4.
  static constexpr int kMaxParity = 32;

  // Default: kNone.
  Kind kind = Kind::kNone;
  // How many segments of a stripe may be lost: parity segments for rs:m (m) and xor (1), extra
  // copies for replicate:r (r - 1), 0 for none. Default 0.
  int m = 0;

  // Parses "none", "replicate:<r>" (2 <= r <= 33), "xor" or "rs:<m>" (1 <= m <= 32), exactly
  // (no spaces, lower case). InvalidArgument naming the text otherwise.
  static Result<Scheme> Parse(std::string_view text);

  // The text Parse accepts: "none", "replicate:2", "xor", "rs:2".
  std::string ToString() const;

  bool operator==(const Scheme&) const = default;
};

}  // namespace memento
