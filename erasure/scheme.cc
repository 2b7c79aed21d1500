// Scheme parsing and printing.
#include "erasure/scheme.h"

#include <charconv>

namespace memento {
namespace {

constexpr char kExpected[] = "expected none, replicate:<r>, xor or rs:<m>";

// The count after "name:", within [lo, hi], or InvalidArgument naming the whole text.
Result<int> ParseCount(std::string_view text, std::string_view count, std::string_view what, int lo,
                       int hi) {
  int value = 0;
  auto [end, ec] = std::from_chars(count.data(), count.data() + count.size(), value);
  const bool digits_only = !count.empty() && end == count.data() + count.size();
  if (digits_only && ec == std::errc::result_out_of_range) {
    return InvalidArgument("erasure scheme '" + std::string(text) + "': " + std::string(what) + " must be " +
                           std::to_string(lo) + ".." + std::to_string(hi) + ", got " + std::string(count));
  }
  if (count.empty() || ec != std::errc() || end != count.data() + count.size()) {
    return InvalidArgument("erasure scheme '" + std::string(text) + "': " + std::string(what) + " '" +
                           std::string(count) + "' is not a whole number");
  }
  if (value < lo || value > hi) {
    return InvalidArgument("erasure scheme '" + std::string(text) + "': " + std::string(what) + " must be " +
                           std::to_string(lo) + ".." + std::to_string(hi) + ", got " + std::to_string(value));
  }
  return value;
}

}  // namespace

Result<Scheme> Scheme::Parse(std::string_view text) {
  if (text == "none") return Scheme{Kind::kNone, 0};
  if (text == "xor") return Scheme{Kind::kXor, 1};
  const size_t colon = text.find(':');
  const std::string_view name = text.substr(0, colon);
  if (colon != std::string_view::npos && (name == "replicate" || name == "rs")) {
    const std::string_view count = text.substr(colon + 1);
    if (name == "replicate") {
      if (count == "1") {
        return InvalidArgument("erasure scheme '" + std::string(text) +
                               "': a single copy protects nothing; use none, or replicate:2 and up");
      }
      MEMENTO_ASSIGN_OR_RETURN(int r, ParseCount(text, count, "copy count r", 2, kMaxParity + 1));
      return Scheme{Kind::kReplicate, r - 1};
    }
    MEMENTO_ASSIGN_OR_RETURN(int m, ParseCount(text, count, "parity count m", 1, kMaxParity));
    return Scheme{Kind::kReedSolomon, m};
  }
  if (name == "replicate" || name == "rs") {
    return InvalidArgument("erasure scheme '" + std::string(text) + "' needs a count: " +
                           (name == "rs" ? "rs:<m>, e.g. rs:2" : "replicate:<r>, e.g. replicate:2"));
  }
  if (name == "xor" || name == "none") {
    return InvalidArgument("erasure scheme '" + std::string(text) + "': " + std::string(name) +
                           " takes no count");
  }
  return InvalidArgument("unknown erasure scheme '" + std::string(text) + "': " + kExpected);
}

std::string Scheme::ToString() const {
  switch (kind) {
    case Kind::kNone: return "none";
    case Kind::kReplicate: return "replicate:" + std::to_string(m + 1);
    case Kind::kXor: return "xor";
    case Kind::kReedSolomon: return "rs:" + std::to_string(m);
  }
  return "scheme(" + std::to_string(static_cast<int>(kind)) + ")";
}

}  // namespace memento
