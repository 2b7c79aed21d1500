// What the fuzz targets share: invariant checks that stop the run with the failed condition (a
// libFuzzer crash, with the input saved), the input as bytes, and the Protobuf round trip.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include <google/protobuf/message_lite.h>

// Aborts with the condition and `detail` (a std::string) when `cond` is false.
#define MEMENTO_FUZZ_CHECK(cond, detail)                                                              \
  do {                                                                                                \
    if (!(cond)) {                                                                                    \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n  %s\n", __FILE__, __LINE__, #cond,          \
                   std::string(detail).c_str());                                                      \
      std::abort();                                                                                   \
    }                                                                                                 \
  } while (0)

namespace memento::fuzz {

inline std::string_view Bytes(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// A parsed message serializes, parses back and serializes to the same bytes again.
template <typename Message>
void CheckRoundTrip(const Message& m) {
  const std::string once = m.SerializeAsString();
  Message back;
  MEMENTO_FUZZ_CHECK(back.ParseFromString(once), m.GetTypeName() + " does not parse its own serialization");
  MEMENTO_FUZZ_CHECK(back.SerializeAsString() == once, m.GetTypeName() + " changes in a parse/serialize round trip");
}

}  // namespace memento::fuzz
