// A minimal streaming JSON writer for the `memento` CLI's --json output: objects, arrays, strings
// (escaped per RFC 8259; invalid UTF-8 becomes U+FFFD), integers and booleans. No dependencies.
// Thread-compatible value type.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace memento {

// `s` as a JSON string literal, quotes included.
std::string JsonQuote(std::string_view s);

// Builds one JSON text. Calls must nest properly: inside an object, each value follows a Key().
// The writer inserts the commas; it does not check the nesting.
class JsonWriter {
 public:
  JsonWriter& BeginObject();
  JsonWriter& EndObject();
  JsonWriter& BeginArray();
  JsonWriter& EndArray();
  JsonWriter& Key(std::string_view key);
  JsonWriter& String(std::string_view value);
  JsonWriter& Int(int64_t value);
  JsonWriter& Uint(uint64_t value);
  JsonWriter& Bool(bool value);
  // A finite number with `decimals` digits after the point (non-finite values are written null).
  JsonWriter& Double(double value, int decimals = 3);
  JsonWriter& Null();

  const std::string& str() const { return out_; }

 private:
  void BeforeValue();

  std::string out_;
  std::vector<bool> has_items_;  // per open container: whether a member was written
  bool after_key_ = false;
};

}  // namespace memento
