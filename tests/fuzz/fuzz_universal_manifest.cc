// libFuzzer target: the universal checkpoint's manifest.pb (ucp_format/universal.h
// ReadUniversalManifest), then reading every tensor it lists and verifying the checkpoint, with
// each file it names present and 4 KiB long. Invariants: an accepted manifest has this build's
// format version; every tensor and blob file it names is a relative path that stays inside the
// checkpoint (no empty, "." or ".." component), and its offset + bytes and its shape's element
// count do not wrap around; it survives a serialize/parse round trip; a tensor read never returns
// more than its file holds; verification returns a list of problems.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/memory_file_system.h"
#include "ucp_format/universal.h"

namespace {

constexpr size_t kMaxFiles = 32;   // files this target creates
constexpr int kMaxReads = 64;      // tensors it reads
const std::string kDir = "/root/ucp";

// The oracle, formulated apart from the reader's own check: the joined path, normalised, names
// something below kDir.
bool StaysInside(const std::string& file) {
  if (file.empty() || file[0] == '/') return false;
  const std::string joined = std::filesystem::path(kDir + "/" + file).lexically_normal().string();
  return joined.rfind(kDir + "/", 0) == 0 && joined.size() > kDir.size() + 1;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static memento::fuzz::MemoryFileSystem* fs = new memento::fuzz::MemoryFileSystem();
  fs->Clear();
  fs->Put(kDir + "/" + memento::kUniversalManifestName, std::string(memento::fuzz::Bytes(data, size)));
  memento::Result<memento::proto::UniversalManifest> m = memento::ReadUniversalManifest(fs, kDir);
  if (!m.ok()) return 0;
  MEMENTO_FUZZ_CHECK(m->format_version() == memento::kUniversalFormatVersion, "format version accepted");
  std::set<std::string> files;
  for (const memento::proto::UniversalParam& p : m->params()) {
    for (const memento::proto::UniversalTensor& t : p.states()) {
      MEMENTO_FUZZ_CHECK(StaysInside(t.file()), "tensor file '" + t.file() + "' accepted");
      MEMENTO_FUZZ_CHECK(t.bytes() <= UINT64_MAX - t.data_offset(), "tensor '" + t.source_name() + "' ends past 2^64");
      int64_t numel = 1;
      for (int64_t d : t.shape()) {
        MEMENTO_FUZZ_CHECK(d >= 0 && !__builtin_mul_overflow(numel, d, &numel), "tensor '" + t.source_name() + "' shape");
      }
      files.insert(t.file());
    }
  }
  for (const memento::proto::UniversalBlob& b : m->blobs()) {
    MEMENTO_FUZZ_CHECK(StaysInside(b.file()), "blob file '" + b.file() + "' accepted");
    MEMENTO_FUZZ_CHECK(b.bytes() <= UINT64_MAX - b.data_offset(), "blob '" + b.name() + "' ends past 2^64");
    files.insert(b.file());
  }
  memento::fuzz::CheckRoundTrip(*m);

  size_t created = 0;
  for (const std::string& f : files) {
    if (++created > kMaxFiles) break;
    // A name that is also a folder of another name (a and a/b) stays a folder.
    if (!fs->Exists(kDir + "/" + f)) fs->Put(kDir + "/" + f, std::string(4096, '\x5a'));
  }
  int reads = 0;
  for (const memento::proto::UniversalParam& p : m->params()) {
    for (const memento::proto::UniversalTensor& t : p.states()) {
      if (++reads > kMaxReads) break;
      memento::Result<std::vector<uint8_t>> bytes = memento::ReadUniversalTensor(fs, kDir, *m, p.name(), t.state());
      if (bytes.ok()) MEMENTO_FUZZ_CHECK(bytes->size() <= 4096, "read more bytes than the file holds");
    }
  }
  memento::Result<std::vector<std::string>> problems = memento::VerifyUniversal(fs, kDir);
  MEMENTO_FUZZ_CHECK(problems.ok() || problems.status().code() != memento::StatusCode::kInternal,
                     problems.status().ToString());
  return 0;
}
