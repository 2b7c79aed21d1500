// libFuzzer target: a native checkpoint's rank metadata (rank-<r>.meta, ucp_format/native_checkpoint.h
// ReadRankMetadata), read through a manifest that agrees with it (so the CRC and the cross checks
// pass and the record's own checks run), then verifying and restoring the checkpoint. The data
// file holds data_bytes of a fixed pattern (when at most 1 MiB). Invariants: an accepted record's
// runs lie inside the data file, each with one CRC per chunk and the size of its fragment (replica
// 0); once its CRCs are made to match the data, VerifyCheckpoint finds no problem and LoadRank,
// onto a slot laid out from the record, returns without reading outside anything.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/crc.h"
#include "core/dtype.h"
#include "core/shard.h"
#include "proto/shard_convert.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/memory_file_system.h"
#include "ucp_format/native_checkpoint.h"

namespace {

constexpr uint64_t kMaxData = uint64_t{1} << 20;   // data file bytes this target writes
constexpr uint64_t kMaxChunks = uint64_t{1} << 14;  // CRCs it recomputes
constexpr uint64_t kMaxSlot = uint64_t{4} << 20;    // slot bytes it lays out for LoadRank
const std::string kDir = "/root/job/step-7";

bool PlainName(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos;
}

uint64_t Chunks(const memento::proto::PersistedRun& run) {
  return run.chunk_bytes() == 0 ? 0 : run.bytes() / run.chunk_bytes() + (run.bytes() % run.chunk_bytes() != 0);
}

void CheckRun(const memento::proto::PersistedRun& run, uint64_t data_bytes, const std::string& what) {
  MEMENTO_FUZZ_CHECK(run.bytes() == 0 || run.chunk_bytes() > 0, what + ": chunk size 0");
  MEMENTO_FUZZ_CHECK(static_cast<uint64_t>(run.chunk_crcs_size()) == Chunks(run), what + ": CRC count");
  MEMENTO_FUZZ_CHECK(run.file_offset() <= data_bytes && run.bytes() <= data_bytes - run.file_offset(),
                     what + ": run outside the data file");
}

// What ReadRankMetadata promises about a record it returns.
void CheckAccepted(const memento::proto::RankMetadata& meta) {
  for (const memento::proto::PersistedTensor& t : meta.tensors()) {
    const std::string what = "tensor '" + t.name() + "'";
    memento::Result<memento::DType> dtype = memento::DTypeFromInt(t.dtype());
    MEMENTO_FUZZ_CHECK(dtype.ok(), what + ": dtype");
    memento::Result<memento::ShardSpec> spec = memento::FromProto(t.spec());
    MEMENTO_FUZZ_CHECK(spec.ok() && spec->Validate().ok(), what + ": spec");
    for (const memento::proto::PersistedRun& run : t.runs()) {
      MEMENTO_FUZZ_CHECK(run.fragment() >= 0 && static_cast<size_t>(run.fragment()) < spec->fragments.size(),
                         what + ": fragment index");
      const memento::Fragment& f = spec->fragments[static_cast<size_t>(run.fragment())];
      uint64_t bytes = 0;
      MEMENTO_FUZZ_CHECK(f.replica_id == 0 && !__builtin_mul_overflow(static_cast<uint64_t>(f.numel()),
                                                                      memento::DTypeSize(*dtype), &bytes) &&
                             bytes == run.bytes(),
                         what + ": run of fragment " + std::to_string(run.fragment()));
      CheckRun(run, meta.data_bytes(), what);
    }
  }
  for (const memento::proto::PersistedBlob& b : meta.blobs()) CheckRun(b.run(), meta.data_bytes(), "blob '" + b.name() + "'");
}

// Writes `meta` as rank 0's record with a manifest that agrees with it.
memento::proto::Manifest WriteCheckpoint(memento::fuzz::MemoryFileSystem* fs, const memento::proto::RankMetadata& meta,
                                         const std::string& bytes) {
  memento::proto::ManifestRank entry;
  entry.set_rank(0);
  entry.set_meta_file("rank-0.meta");
  entry.set_data_file(PlainName(meta.data_file()) && meta.data_file() != entry.meta_file() ? meta.data_file()
                                                                                            : "rank-0.data");
  entry.set_data_bytes(meta.data_bytes());
  entry.set_meta_crc(memento::Crc64(bytes.data(), bytes.size()));
  memento::proto::Manifest manifest = memento::BuildManifest("job", meta.step(), 1, {entry});
  fs->Put(kDir + "/manifest", manifest.SerializeAsString());
  fs->Put(kDir + "/" + entry.meta_file(), bytes);
  return manifest;
}

std::string Pattern(uint64_t n) {
  std::string out(static_cast<size_t>(n), '\0');
  for (uint64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<char>((i * 31 + 7) & 0xff);
  return out;
}

// Sets every run's CRCs from the data file; false when that is too much work here.
bool FixCrcs(memento::proto::RankMetadata* meta, const std::string& file) {
  uint64_t chunks = 0;
  auto fix = [&](memento::proto::PersistedRun* run) {
    chunks += Chunks(*run);
    if (chunks > kMaxChunks) return false;
    run->clear_chunk_crcs();
    for (uint64_t at = 0; at < run->bytes(); at += run->chunk_bytes()) {
      const uint64_t n = std::min(run->chunk_bytes(), run->bytes() - at);
      run->add_chunk_crcs(memento::Crc64(file.data() + run->file_offset() + at, static_cast<size_t>(n)));
    }
    return true;
  };
  for (memento::proto::PersistedTensor& t : *meta->mutable_tensors()) {
    for (memento::proto::PersistedRun& run : *t.mutable_runs()) {
      if (!fix(&run)) return false;
    }
  }
  for (memento::proto::PersistedBlob& b : *meta->mutable_blobs()) {
    if (!fix(b.mutable_run())) return false;
  }
  return true;
}

// A slot layout for every tensor and blob of the record, as an agent would register them; false when
// the slot would be too large here.
bool LayOut(const memento::proto::RankMetadata& meta, memento::proto::RankRecord* layout) {
  uint64_t offset = 0;
  layout->set_rank(0);
  layout->set_world_size(1);
  for (const memento::proto::PersistedTensor& t : meta.tensors()) {
    memento::Result<memento::ShardSpec> spec = memento::FromProto(t.spec());
    const uint64_t bytes = static_cast<uint64_t>(spec->local_numel) * memento::DTypeSize(static_cast<memento::DType>(t.dtype()));
    if (spec->local_numel > static_cast<int64_t>(kMaxSlot) || offset + bytes > kMaxSlot) return false;
    memento::proto::TensorRecord* r = layout->add_tensors();
    r->set_name(t.name());
    r->set_dtype(t.dtype());
    *r->mutable_spec() = t.spec();
    r->set_slot_offset(offset);
    r->set_bytes(bytes);
    offset = (offset + bytes + 4095) / 4096 * 4096;
  }
  for (const memento::proto::PersistedBlob& b : meta.blobs()) {
    if (b.run().bytes() > kMaxSlot || offset + 8 + b.run().bytes() > kMaxSlot) return false;
    memento::proto::BlobRecord* r = layout->add_blobs();
    r->set_name(b.name());
    r->set_capacity(b.run().bytes());
    r->set_slot_offset(offset);
    offset = (offset + 8 + b.run().bytes() + 4095) / 4096 * 4096;
  }
  layout->set_slot_bytes(std::max<uint64_t>(offset, 4096));
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static memento::fuzz::MemoryFileSystem* fs = new memento::fuzz::MemoryFileSystem();
  fs->Clear();
  const std::string bytes(memento::fuzz::Bytes(data, size));
  memento::proto::RankMetadata parsed;
  if (!parsed.ParseFromString(bytes)) parsed.Clear();
  memento::proto::Manifest manifest = WriteCheckpoint(fs, parsed, bytes);
  const std::string data_path = kDir + "/" + manifest.ranks(0).data_file();
  const bool small = parsed.data_bytes() <= kMaxData;
  const std::string file = small ? Pattern(parsed.data_bytes()) : std::string();
  if (small) fs->Put(data_path, file);

  memento::Result<memento::proto::RankMetadata> meta = memento::ReadRankMetadata(fs, kDir, manifest, 0);
  memento::Result<std::vector<memento::VerifyProblem>> problems = memento::VerifyCheckpoint(fs, kDir);
  MEMENTO_FUZZ_CHECK(problems.ok(), problems.status().ToString());
  if (!meta.ok()) {
    MEMENTO_FUZZ_CHECK(!problems->empty(), "verify passes a record ReadRankMetadata refuses");
    return 0;
  }
  CheckAccepted(*meta);
  memento::fuzz::CheckRoundTrip(*meta);
  if (!small) return 0;

  memento::proto::RankMetadata fixed = *meta;
  if (!FixCrcs(&fixed, file)) return 0;
  manifest = WriteCheckpoint(fs, fixed, fixed.SerializeAsString());
  problems = memento::VerifyCheckpoint(fs, kDir);
  MEMENTO_FUZZ_CHECK(problems.ok() && problems->empty(),
                     "verify finds problems in a record with matching CRCs: " +
                         (problems.ok() ? (*problems)[0].ToString() : problems.status().ToString()));
  memento::proto::RankRecord layout;
  if (!LayOut(fixed, &layout)) return 0;
  std::vector<uint8_t> slot(static_cast<size_t>(layout.slot_bytes()));
  memento::LoadRank(fs, kDir, manifest, layout, slot.data()).IgnoreError();
  return 0;
}
