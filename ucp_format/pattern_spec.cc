// The pattern spec: textproto parsing (Protobuf TextFormat) and regex compilation.
#include "ucp_format/pattern_spec.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include "core/shard.h"

namespace memento {
namespace {

constexpr const char* kDefaultStateRegex = "^(.+)\\.(exp_avg|exp_avg_sq|step)$";

// Collects TextFormat's parse errors instead of logging them.
class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (first.empty()) first = "line " + std::to_string(line + 1) + " column " + std::to_string(column + 1) + ": " + message;
  }
  void AddWarning(int, int, const std::string&) override {}
  std::string first;
};

Result<std::regex> Compile(const std::string& pattern, const std::string& what) {
  if (!RegexNumbersFit(pattern)) return InvalidArgument(what + ": bad regex '" + pattern + "': a number of more than 9 digits");
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    return InvalidArgument(what + ": bad regex '" + pattern + "': " + e.what());
  }
}

}  // namespace

bool RegexNumbersFit(const std::string& pattern) {
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '\\' && pattern[i] != '{' && pattern[i] != ',') continue;
    size_t digits = 0;
    while (i + 1 + digits < pattern.size() && pattern[i + 1 + digits] >= '0' && pattern[i + 1 + digits] <= '9') ++digits;
    if (digits > 9) return false;
    if (pattern[i] == '\\') ++i;  // the escaped character is not an escape itself
  }
  return true;
}

PatternSpec::PatternSpec() : states_(kDefaultStateRegex, std::regex::ECMAScript) {}

Result<PatternSpec> PatternSpec::Parse(const std::string& textproto) {
  PatternSpec spec;
  google::protobuf::TextFormat::Parser parser;
  ErrorCollector errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(textproto, &spec.proto_)) {
    return InvalidArgument("pattern spec: " + (errors.first.empty() ? std::string("parse error") : errors.first));
  }
  const proto::PatternSpec& p = spec.proto_;
  if (p.source().tp() < 0 || p.source().dp() < 0 || p.source().pp() < 0) {
    return InvalidArgument("pattern spec: source degrees must be positive");
  }
  if (!p.states().regex().empty()) {
    MEMENTO_ASSIGN_OR_RETURN(spec.states_, Compile(p.states().regex(), "pattern spec: states"));
    if (spec.states_.mark_count() < 2) {
      return InvalidArgument("pattern spec: states regex '" + p.states().regex() +
                             "' needs two capture groups (parameter, state)");
    }
  }
  if (!p.states().value_state().empty()) spec.value_state_ = p.states().value_state();
  for (int i = 0; i < p.rule_size(); ++i) {
    const proto::PatternRule& r = p.rule(i);
    const std::string what = "pattern spec rule " + std::to_string(i) + " ('" + r.pattern() + "')";
    if (r.pattern().empty()) return InvalidArgument(what + ": empty pattern");
    MEMENTO_ASSIGN_OR_RETURN(std::regex re, Compile(r.pattern(), what));
    spec.rules_.push_back(std::move(re));
    if (r.layout_case() == proto::PatternRule::LAYOUT_NOT_SET && !r.pipeline_replicated()) {
      return InvalidArgument(what + ": says nothing (give replicated, average, split, sub_params, vocab or "
                             "pipeline_replicated)");
    }
    if (r.has_split() && r.split().dim() < 0) return InvalidArgument(what + ": split dim must be >= 0");
    if (r.has_sub_params()) {
      if (r.sub_params().dim() != 0) {
        return InvalidArgument(what + ": sub_params along dim " + std::to_string(r.sub_params().dim()) +
                               " is not supported (sub-tensors must be stacked along dim 0)");
      }
      if (r.sub_params().sizes_size() == 0) return InvalidArgument(what + ": sub_params needs sizes");
      for (int64_t s : r.sub_params().sizes()) {
        if (s <= 0) return InvalidArgument(what + ": sub_params sizes must be positive");
      }
    }
    if (r.has_vocab() && r.vocab().original_size() <= 0) {
      return InvalidArgument(what + ": vocab original_size must be positive");
    }
  }
  return spec;
}

Result<PatternSpec> PatternSpec::FromFile(FileSystem* fs, const std::string& path) {
  MEMENTO_ASSIGN_OR_RETURN(std::string text, ReadFileToString(fs, path));
  Result<PatternSpec> spec = Parse(text);
  if (!spec.ok()) return spec.status().WithContext(path);
  return spec;
}

void PatternSpec::SplitName(const std::string& tensor, std::string* param, std::string* state) const {
  std::smatch m;
  if (std::regex_match(tensor, m, states_) && m.size() >= 3 && m[1].length() > 0) {
    *param = m[1].str();
    *state = m[2].str();
    return;
  }
  *param = tensor;
  *state = value_state_;
}

int PatternSpec::Match(const std::string& param) const {
  for (size_t i = 0; i < rules_.size(); ++i) {
    if (std::regex_match(param, rules_[i])) return static_cast<int>(i);
  }
  return -1;
}

std::vector<int> PatternSpec::AllMatches(const std::string& param) const {
  std::vector<int> out;
  for (size_t i = 0; i < rules_.size(); ++i) {
    if (std::regex_match(param, rules_[i])) out.push_back(static_cast<int>(i));
  }
  return out;
}

std::string RuleKindString(const proto::PatternRule& rule) {
  std::string s;
  switch (rule.layout_case()) {
    case proto::PatternRule::kReplicated: s = "replicated"; break;
    case proto::PatternRule::kAverage: s = "average"; break;
    case proto::PatternRule::kSplit: s = "split dim " + std::to_string(rule.split().dim()); break;
    case proto::PatternRule::kSubParams: {
      std::vector<int64_t> sizes(rule.sub_params().sizes().begin(), rule.sub_params().sizes().end());
      s = "sub_params dim " + std::to_string(rule.sub_params().dim()) + " " + ShapeString(sizes);
      break;
    }
    case proto::PatternRule::kVocab: s = "vocab " + std::to_string(rule.vocab().original_size()); break;
    case proto::PatternRule::LAYOUT_NOT_SET: break;
  }
  if (rule.pipeline_replicated()) s += s.empty() ? "pipeline_replicated" : " pipeline_replicated";
  return s;
}

}  // namespace memento
