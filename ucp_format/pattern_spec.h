// The pattern spec, the "universal checkpoint language" (DESIGN §4): rules by parameter-name
// regex that say how per-rank tensors whose metadata is partial form a global tensor (replicated,
// averaged, split along dim d, fused sub-parameters, vocab, pipeline-replicated), and how tensor
// names split into a parameter and its optimizer states. Schema: proto/universal.proto
// (PatternSpec); format and examples: docs/formats/universal-checkpoint.md.
// A compiled PatternSpec is immutable after Parse and safe to share between threads.
#pragma once

#include <cstdint>
#include <regex>
#include <string>
#include <vector>

#include "core/file_system.h"
#include "core/status.h"
#include "proto/universal.pb.h"

namespace memento {

class PatternSpec {
 public:
  // The default spec: no rules, the default state naming, degrees 1.
  PatternSpec();
  // Parses a textproto PatternSpec and compiles its regexes. InvalidArgument naming the rule (index
  // and pattern) for a bad regex, a rule without a layout or pipeline_replicated, a bad dim or size.
  static Result<PatternSpec> Parse(const std::string& textproto);
  static Result<PatternSpec> FromFile(FileSystem* fs, const std::string& path);

  // Splits a tensor name into (parameter, state) by the state naming regex.
  void SplitName(const std::string& tensor, std::string* param, std::string* state) const;
  // Index of the first rule whose pattern matches the whole parameter name, -1 when none.
  int Match(const std::string& param) const;
  // Every rule matching `param` (for the dead-rule message: which earlier rule took a name).
  std::vector<int> AllMatches(const std::string& param) const;

  const proto::PatternSpec& proto() const { return proto_; }
  const proto::PatternRule& rule(int i) const { return proto_.rule(i); }
  int rule_count() const { return proto_.rule_size(); }
  int tp() const { return proto_.source().tp() > 0 ? proto_.source().tp() : 1; }
  int dp() const { return proto_.source().dp() > 0 ? proto_.source().dp() : 1; }
  int pp() const { return proto_.source().pp() > 0 ? proto_.source().pp() : 1; }
  bool strict() const { return !proto_.allow_unmatched_rules(); }
  const std::string& value_state() const { return value_state_; }

 private:
  proto::PatternSpec proto_;
  std::string value_state_ = "fp32";
  std::regex states_;
  std::vector<std::regex> rules_;
};

// Whether std::regex (libstdc++) can read every number in `pattern`: it reads a back-reference
// (\N) or a count ({n,m}) into a long without checking, and a longer run of digits overflows
// (undefined behaviour). False for a run of more than 9 digits after '\', '{' or ','. Callers
// refuse such a pattern before compiling it.
bool RegexNumbersFit(const std::string& pattern);

// "split dim 1", "sub_params dim 0 [64,16,16]", "vocab 1000", "replicated", "average",
// "pipeline_replicated", for messages and the manifest.
std::string RuleKindString(const proto::PatternRule& rule);

}  // namespace memento
