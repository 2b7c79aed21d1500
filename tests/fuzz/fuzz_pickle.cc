// libFuzzer target: the pickle machine (converters/torch_pickle.h) on arbitrary bytes, in both
// modes. It must return a value or an error, never crash, hang or run anything. Invariants: what
// strict mode accepts, the default mode accepts as the same value; a value the writer accepts
// reads back as the same value, and writing that gives the same bytes.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <utility>

#include "converters/torch_pickle.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using memento::PickleValue;
using K = PickleValue::Kind;

bool SameTensor(const memento::TorchTensorRef& a, const memento::TorchTensorRef& b) {
  auto location = [](const std::string& l) { return l.empty() ? std::string("cpu") : l; };
  return a.storage_key == b.storage_key && location(a.location) == location(b.location) && a.dtype == b.dtype &&
         a.storage_numel == b.storage_numel && a.storage_offset == b.storage_offset && a.size == b.size &&
         a.stride == b.stride;
}

// Structural equality; floats by bits (NaN equals itself). A pickle's memo may share a container
// many times (2^n paths through n levels): each pair of nodes is compared once.
bool Same(const PickleValue& a, const PickleValue& b, std::set<std::pair<const PickleValue*, const PickleValue*>>* seen) {
  if (!seen->emplace(&a, &b).second) return true;  // compared before (values are acyclic)
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case K::kNone: return true;
    case K::kBool: return a.b == b.b;
    case K::kInt: return a.i == b.i;
    case K::kFloat: return std::memcmp(&a.f, &b.f, sizeof a.f) == 0;
    case K::kTensor: return SameTensor(a.tensor, b.tensor);
    case K::kDict:
      if (a.ordered != b.ordered) return false;
      break;
    default:
      break;
  }
  if (a.s != b.s || a.items.size() != b.items.size() || a.entries.size() != b.entries.size()) return false;
  for (size_t i = 0; i < a.items.size(); ++i) {
    if (!Same(*a.items[i], *b.items[i], seen)) return false;
  }
  for (size_t i = 0; i < a.entries.size(); ++i) {
    if (!Same(*a.entries[i].first, *b.entries[i].first, seen) || !Same(*a.entries[i].second, *b.entries[i].second, seen)) {
      return false;
    }
  }
  return true;
}

bool Same(const PickleValue& a, const PickleValue& b) {
  std::set<std::pair<const PickleValue*, const PickleValue*>> seen;
  return Same(a, b, &seen);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes = memento::fuzz::Bytes(data, size);
  memento::PickleLimits limits;
  memento::Result<memento::PickleValuePtr> v = memento::Unpickle(bytes, limits);
  limits.strict_globals = true;
  memento::Result<memento::PickleValuePtr> strict = memento::Unpickle(bytes, limits);
  if (strict.ok()) {
    MEMENTO_FUZZ_CHECK(v.ok(), "strict mode accepted what the default mode refuses: " + v.status().ToString());
    MEMENTO_FUZZ_CHECK(Same(**strict, **v), "strict and default mode built different values");
  }
  if (!v.ok()) return 0;
  memento::Result<std::string> written = memento::PickleForTorch(**v);
  if (!written.ok()) return 0;
  memento::Result<memento::PickleValuePtr> back = memento::Unpickle(*written, {});
  MEMENTO_FUZZ_CHECK(back.ok(), "the writer's pickle does not read back: " + back.status().ToString());
  MEMENTO_FUZZ_CHECK(Same(**v, **back), "a written value reads back different");
  memento::Result<std::string> again = memento::PickleForTorch(**back);
  MEMENTO_FUZZ_CHECK(again.ok() && *again == *written, "writing a read-back value gives other bytes");
  return 0;
}
