// libFuzzer target: pattern specs (ucp_format/pattern_spec.h), the textproto rules an operator
// passes to `memento convert --pattern` (a universal manifest keeps a copy, never compiled again).
// Invariants: an accepted spec prints (TextFormat) to text that parses to the same spec; its
// degrees are >= 1; each rule says what it does. Matching names is not fuzzed: the regexes are the
// operator's own, and std::regex backtracks (a pattern like "(.+)*x" is exponential in the name).
#include <cstddef>
#include <cstdint>
#include <string>

#include <google/protobuf/text_format.h>

#include "tests/fuzz/fuzz_check.h"
#include "ucp_format/pattern_spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  memento::Result<memento::PatternSpec> spec = memento::PatternSpec::Parse(std::string(memento::fuzz::Bytes(data, size)));
  if (!spec.ok()) return 0;
  MEMENTO_FUZZ_CHECK(spec->tp() >= 1 && spec->dp() >= 1 && spec->pp() >= 1, "degrees below 1");
  for (int i = 0; i < spec->rule_count(); ++i) {
    MEMENTO_FUZZ_CHECK(!memento::RuleKindString(spec->rule(i)).empty(), "rule " + std::to_string(i) + " says nothing");
  }
  std::string printed;
  MEMENTO_FUZZ_CHECK(google::protobuf::TextFormat::PrintToString(spec->proto(), &printed), "cannot print the spec");
  memento::Result<memento::PatternSpec> back = memento::PatternSpec::Parse(printed);
  MEMENTO_FUZZ_CHECK(back.ok(), "the printed spec does not parse: " + back.status().ToString() + "\n" + printed);
  MEMENTO_FUZZ_CHECK(back->proto().SerializeAsString() == spec->proto().SerializeAsString(),
                     "the spec changes in a print/parse round trip:\n" + printed);
  return 0;
}
