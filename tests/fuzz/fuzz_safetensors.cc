// libFuzzer target: the safetensors reader (ucp_format/safetensors.h) on arbitrary bytes, then every
// tensor read. Invariants: an accepted header describes tensors of unique keys whose sizes are
// elements x width and which tile the data buffer up to the end of the file; each reads back with
// its size; the elements of its shape (every partial product) fit in int64, so readers may take
// NumElements; and the writer's header for the same tensors (and metadata) reads back equal.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "core/shard.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/memory_file_system.h"
#include "ucp_format/safetensors.h"

namespace {

using memento::SafetensorsEntry;

bool SameEntry(const SafetensorsEntry& a, const SafetensorsEntry& b) {
  return a.key == b.key && a.dtype == b.dtype && a.shape == b.shape && a.begin == b.begin && a.end == b.end;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static memento::fuzz::MemoryFileSystem* fs = new memento::fuzz::MemoryFileSystem();
  fs->Clear();
  fs->Put("/in.safetensors", std::string(memento::fuzz::Bytes(data, size)));
  memento::Result<std::unique_ptr<memento::SafetensorsFile>> f = memento::SafetensorsFile::Open(fs, "/in.safetensors");
  if (!f.ok()) return 0;
  std::vector<SafetensorsEntry> sorted = (*f)->entries();
  std::sort(sorted.begin(), sorted.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
    return std::pair(a.begin, a.end) < std::pair(b.begin, b.end);
  });
  std::set<std::string> keys;
  uint64_t at = 0;
  for (const SafetensorsEntry& e : sorted) {
    MEMENTO_FUZZ_CHECK(keys.insert(e.key).second, "key '" + e.key + "' accepted twice");
    MEMENTO_FUZZ_CHECK(e.key != "__metadata__", "a tensor named __metadata__");
    MEMENTO_FUZZ_CHECK(e.begin == at && e.end >= e.begin, "tensor '" + e.key + "' does not tile the buffer");
    int64_t numel = 1;
    for (int64_t d : e.shape) {
      MEMENTO_FUZZ_CHECK(d >= 0 && !__builtin_mul_overflow(numel, d, &numel),
                         "tensor '" + e.key + "' of shape " + memento::ShapeString(e.shape));
    }
    uint64_t want = 0;
    MEMENTO_FUZZ_CHECK(!__builtin_mul_overflow(static_cast<uint64_t>(numel), memento::DTypeSize(e.dtype), &want) &&
                           e.end - e.begin == want,
                       "tensor '" + e.key + "' of the wrong size");
    at = e.end;
    memento::Result<std::vector<uint8_t>> bytes = (*f)->Read(e.key);
    MEMENTO_FUZZ_CHECK(bytes.ok() && bytes->size() == want, "tensor '" + e.key + "' does not read back");
  }
  MEMENTO_FUZZ_CHECK((*f)->data_start() + at == size, "the tensors do not end where the file does");

  // The writer's header for the same tensors, in buffer order, reads back with the same entries.
  memento::SafetensorsHeader header;
  for (const SafetensorsEntry& e : sorted) {
    // The writer refuses an empty key, which the reader (as the reference implementation) takes.
    if (!header.Add(e.key, e.dtype, e.shape).ok()) return 0;
  }
  for (const auto& [k, v] : (*f)->metadata()) header.SetMetadata(k, v);
  std::string file = header.Serialize();
  file.append(static_cast<size_t>(header.data_bytes()), '\0');
  fs->Put("/out.safetensors", std::move(file));
  memento::Result<std::unique_ptr<memento::SafetensorsFile>> back = memento::SafetensorsFile::Open(fs, "/out.safetensors");
  MEMENTO_FUZZ_CHECK(back.ok(), "the writer's header does not read back: " + back.status().ToString());
  MEMENTO_FUZZ_CHECK((*back)->metadata() == (*f)->metadata(), "metadata differs after a round trip");
  MEMENTO_FUZZ_CHECK((*back)->entries().size() == sorted.size(), "entries differ after a round trip");
  for (size_t i = 0; i < sorted.size(); ++i) {
    MEMENTO_FUZZ_CHECK(SameEntry((*back)->entries()[i], sorted[i]), "tensor '" + sorted[i].key + "' differs after a round trip");
  }
  return 0;
}
