// libFuzzer target: the native checkpoint's manifest (ucp_format/native_checkpoint.h ReadManifest),
// then listing and verifying the checkpoint it commits (its rank files are absent). Invariants: an
// accepted manifest has this build's format version and names each rank 0..world_size-1 once, with
// meta and data files that are plain names inside the directory; it survives a serialize/parse
// round trip; and listing reports it committed with its world size and bytes.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/memory_file_system.h"
#include "ucp_format/native_checkpoint.h"

namespace {

bool PlainName(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static memento::fuzz::MemoryFileSystem* fs = new memento::fuzz::MemoryFileSystem();
  fs->Clear();
  const std::string dir = memento::CheckpointDir("/root", "job", 7);
  fs->Put(dir + "/manifest", std::string(memento::fuzz::Bytes(data, size)));
  memento::Result<memento::proto::Manifest> m = memento::ReadManifest(fs, dir);

  memento::Result<std::vector<memento::CheckpointInfo>> listed = memento::ListCheckpoints(fs, memento::JobDir("/root", "job"));
  MEMENTO_FUZZ_CHECK(listed.ok() && listed->size() == 1 && (*listed)[0].step == 7, "listing the checkpoint failed");
  MEMENTO_FUZZ_CHECK((*listed)[0].committed == m.ok(), "listing and ReadManifest disagree");
  memento::Result<std::vector<memento::VerifyProblem>> verified = memento::VerifyCheckpoint(fs, dir);
  MEMENTO_FUZZ_CHECK(verified.ok() == m.ok(), "verify and ReadManifest disagree: " + verified.status().ToString());
  if (!m.ok()) return 0;

  MEMENTO_FUZZ_CHECK(m->format_version() == memento::kNativeFormatVersion, "format version accepted");
  MEMENTO_FUZZ_CHECK(m->world_size() > 0 && m->ranks_size() == m->world_size(), "rank count accepted");
  std::vector<bool> seen(static_cast<size_t>(m->world_size()), false);
  for (const memento::proto::ManifestRank& r : m->ranks()) {
    MEMENTO_FUZZ_CHECK(r.rank() >= 0 && r.rank() < m->world_size() && !seen[static_cast<size_t>(r.rank())],
                       "rank " + std::to_string(r.rank()) + " accepted");
    seen[static_cast<size_t>(r.rank())] = true;
    MEMENTO_FUZZ_CHECK(PlainName(r.meta_file()) && PlainName(r.data_file()),
                       "file names '" + r.meta_file() + "', '" + r.data_file() + "' accepted");
  }
  MEMENTO_FUZZ_CHECK((*listed)[0].ranks == m->world_size() && (*listed)[0].bytes == m->total_bytes(),
                     "listing reports another size");
  // Every rank file is missing: one problem per rank, each naming a path inside the checkpoint.
  MEMENTO_FUZZ_CHECK(verified->size() == static_cast<size_t>(m->world_size()), "verify found other problems");
  for (const memento::VerifyProblem& p : *verified) {
    MEMENTO_FUZZ_CHECK(p.file.compare(0, dir.size() + 1, dir + "/") == 0 && p.what == "missing file", p.ToString());
  }
  memento::fuzz::CheckRoundTrip(*m);
  return 0;
}
