// libFuzzer target: the agent's catalog records (agent/catalog.h), the values a restarted agent
// decodes from RocksDB and reads its slots by. The first byte picks the record (node, rank,
// version); the rest is the value. Invariants: a record survives a serialize/parse round trip; a
// rank layout that passes CheckRankLayout, and every CRC region of a version (captures and parity)
// that passes CheckRegionCrc, is read only inside a slot of that size (the reads run on a real
// buffer, under ASan), chunk by chunk as the agent verifies them.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "agent/catalog.h"
#include "core/crc.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

constexpr uint64_t kSlotBytes = uint64_t{64} << 10;  // the slot the version records are checked against

// Reads every chunk of a region that passed CheckRegionCrc, as NodeState::VerifyRank does.
void ReadRegion(const memento::proto::RegionCrc& r, const std::vector<uint8_t>& slot) {
  uint64_t covered = 0;
  for (int c = 0; c < r.chunk_crcs_size(); ++c) {
    const auto [begin, end] = memento::RegionChunk(r, c);
    MEMENTO_FUZZ_CHECK(begin <= end && end <= slot.size(), "chunk " + std::to_string(c) + " of '" + r.name() + "'");
    (void)memento::Crc64(slot.data() + begin, static_cast<size_t>(end - begin));
    covered += end - begin;
  }
  MEMENTO_FUZZ_CHECK(covered == r.bytes(), "the chunks of '" + r.name() + "' do not cover it");
}

void Version(const std::string& value) {
  memento::proto::VersionRecord v;
  if (!v.ParseFromString(value)) return;
  memento::fuzz::CheckRoundTrip(v);
  static const std::vector<uint8_t>* slot = new std::vector<uint8_t>(kSlotBytes, 0x3c);
  auto check = [&](const memento::proto::RegionCrc& r) {
    if (memento::CheckRegionCrc(r, kSlotBytes).ok()) ReadRegion(r, *slot);
  };
  for (const auto& c : v.captured()) {
    for (const auto& r : c.crcs()) check(r);
  }
  for (const auto& r : v.parity_crcs()) check(r);
  for (const auto& p : v.peer_captures()) {
    for (const auto& c : p.captures()) {
      for (const auto& r : c.crcs()) check(r);
    }
  }
}

void Rank(const std::string& value) {
  memento::proto::RankRecord r;
  if (!r.ParseFromString(value)) return;
  memento::fuzz::CheckRoundTrip(r);
  if (!memento::CheckRankLayout(r).ok()) return;
  // Small slots are read for real; every region is checked by arithmetic.
  std::vector<uint8_t> slot;
  if (r.slot_bytes() <= kSlotBytes) slot.assign(static_cast<size_t>(r.slot_bytes()), 0x5a);
  for (const auto& t : r.tensors()) {
    MEMENTO_FUZZ_CHECK(t.slot_offset() <= r.slot_bytes() && t.bytes() <= r.slot_bytes() - t.slot_offset(),
                       "tensor '" + t.name() + "'");
    if (!slot.empty()) (void)memento::Crc64(slot.data() + t.slot_offset(), static_cast<size_t>(t.bytes()));
  }
  for (const auto& b : r.blobs()) {
    MEMENTO_FUZZ_CHECK(b.slot_offset() <= r.slot_bytes() && r.slot_bytes() - b.slot_offset() >= 8 &&
                           b.capacity() <= r.slot_bytes() - b.slot_offset() - 8,
                       "blob '" + b.name() + "'");
    if (!slot.empty()) (void)memento::Crc64(slot.data() + b.slot_offset(), static_cast<size_t>(8 + b.capacity()));
  }
}

void Node(const std::string& value) {
  memento::proto::NodeRecord n;
  if (!n.ParseFromString(value)) return;
  memento::fuzz::CheckRoundTrip(n);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string value(memento::fuzz::Bytes(data + 1, size - 1));
  switch (data[0] % 3) {
    case 0: Node(value); break;
    case 1: Rank(value); break;
    case 2: Version(value); break;
  }
  return 0;
}
