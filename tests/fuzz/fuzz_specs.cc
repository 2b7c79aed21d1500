// libFuzzer target: the small text parsers of operator input: erasure schemes (erasure/scheme.h,
// --ec and the catalog), memento-run's --inject drills and whole command lines
// (launcher/options.h), fault-injection specs (core/file_system.h, --inject-fs and
// MEMENTO_FAULT_FS) and dtype names (core/dtype.h, also read from safetensors headers). The first
// byte picks the parser; the rest is the text (for a command line, NUL-separated arguments).
// Invariants: accepted values are in their documented ranges and print back to text that parses
// to the same value.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/file_system.h"
#include "erasure/scheme.h"
#include "launcher/options.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/memory_file_system.h"

namespace {

void Scheme(const std::string& text) {
  memento::Result<memento::Scheme> s = memento::Scheme::Parse(text);
  if (!s.ok()) return;
  const int most = s->kind == memento::Scheme::Kind::kNone ? 0
                   : s->kind == memento::Scheme::Kind::kXor ? 1
                                                            : memento::Scheme::kMaxParity;
  MEMENTO_FUZZ_CHECK(s->m >= (s->kind == memento::Scheme::Kind::kNone ? 0 : 1) && s->m <= most,
                     "scheme '" + text + "' with m = " + std::to_string(s->m));
  memento::Result<memento::Scheme> back = memento::Scheme::Parse(s->ToString());
  MEMENTO_FUZZ_CHECK(back.ok() && *back == *s, "scheme '" + text + "' prints as '" + s->ToString() + "'");
}

void Injection(const std::string& text) {
  memento::Result<memento::launcher::Injection> in = memento::launcher::ParseInjection(text);
  if (!in.ok()) return;
  MEMENTO_FUZZ_CHECK(in->target >= 0 && (in->during_recovery || in->step >= 1), "drill '" + text + "'");
  MEMENTO_FUZZ_CHECK(!in->during_recovery || in->kind == memento::launcher::Injection::Kind::kNodeLoss,
                     "drill '" + text + "' during recovery");
  const char* target = in->kind == memento::launcher::Injection::Kind::kNodeLoss ||
                               in->kind == memento::launcher::Injection::Kind::kAgentCrash
                           ? ":node="
                           : ":rank=";
  const std::string printed = std::string(memento::launcher::InjectionKindName(in->kind)) + target +
                              std::to_string(in->target) +
                              (in->during_recovery ? ":during=recovery" : ":step=" + std::to_string(in->step));
  memento::Result<memento::launcher::Injection> back = memento::launcher::ParseInjection(printed);
  MEMENTO_FUZZ_CHECK(back.ok() && back->kind == in->kind && back->target == in->target && back->step == in->step &&
                         back->during_recovery == in->during_recovery,
                     "drill '" + text + "' prints as '" + printed + "'");
}

void CommandLine(const std::string& text) {
  std::vector<std::string> args = {"memento-run"};
  for (size_t begin = 0; begin <= text.size();) {
    size_t end = text.find('\0', begin);
    if (end == std::string::npos) end = text.size();
    args.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  memento::Result<memento::launcher::Options> o =
      memento::launcher::ParseOptions(static_cast<int>(argv.size()), argv.data());
  if (!o.ok() || o->help) return;
  MEMENTO_FUZZ_CHECK(!o->command.empty() && o->hostfile.empty() != (o->simulate_nodes == 0), "options accepted");
  MEMENTO_FUZZ_CHECK(memento::Scheme::Parse(o->ec).ok(), "--ec '" + o->ec + "' accepted");
  MEMENTO_FUZZ_CHECK(o->ranks_per_node >= 1 && o->spares >= 0 && o->max_restarts >= 0 && o->hang_timeout_s >= 0 &&
                         o->stop_grace_s >= 0 && o->start_timeout_s >= 0,
                     "a count or time out of range accepted");
}

void FaultSpec(const std::string& text) {
  memento::fuzz::MemoryFileSystem base;
  memento::Result<std::unique_ptr<memento::FaultInjectionFileSystem>> fs =
      memento::FaultInjectionFileSystem::FromSpec(&base, text);
  if (!fs.ok()) return;
  MEMENTO_FUZZ_CHECK((*fs)->injected_faults() == 0, "faults injected before any I/O");
}

void DTypeName(const std::string& text) {
  memento::Result<memento::DType> d = memento::ParseDType(text);
  if (!d.ok()) return;
  MEMENTO_FUZZ_CHECK(memento::DTypeSize(*d) > 0, "dtype '" + text + "' without a width");
  memento::Result<memento::DType> back = memento::ParseDType(memento::DTypeName(*d));
  MEMENTO_FUZZ_CHECK(back.ok() && *back == *d, "dtype '" + text + "' prints as " + std::string(memento::DTypeName(*d)));
  memento::Result<memento::DType> code = memento::DTypeFromInt(static_cast<int64_t>(*d));
  MEMENTO_FUZZ_CHECK(code.ok() && *code == *d, "dtype '" + text + "' has no code");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string text(memento::fuzz::Bytes(data + 1, size - 1));
  switch (data[0] % 5) {
    case 0: Scheme(text); break;
    case 1: Injection(text); break;
    case 2: CommandLine(text); break;
    case 3: FaultSpec(text); break;
    case 4: DTypeName(text); break;
  }
  return 0;
}
