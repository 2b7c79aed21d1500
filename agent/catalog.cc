// Catalog on RocksDB. Keys: "node", "rank/<8-digit rank>", "version/<20-digit step>".
#include "agent/catalog.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include <algorithm>
#include <cstdio>

#include "agent/rocksdb_status.h"

namespace memento {
namespace {

std::string RankKey(int32_t rank) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "rank/%08d", rank);
  return buf;
}

std::string VersionKey(int64_t step) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "version/%020lld", static_cast<long long>(step));
  return buf;
}

template <typename T>
Result<std::vector<T>> ParseAll(const std::vector<std::string>& values, const std::string& what) {
  std::vector<T> out;
  for (const std::string& v : values) {
    T rec;
    if (!rec.ParseFromString(v)) return DataLoss("catalog holds a malformed " + what + " record");
    out.push_back(std::move(rec));
  }
  return out;
}

}  // namespace

Status CheckRegionCrc(const proto::RegionCrc& r, uint64_t slot_bytes) {
  const std::string what = "catalog CRC record of '" + r.name() + "'";
  if (r.offset() > slot_bytes || r.bytes() > slot_bytes - r.offset()) {
    return DataLoss(what + ": " + std::to_string(r.bytes()) + " bytes at " + std::to_string(r.offset()) +
                    " lie outside the slot of " + std::to_string(slot_bytes));
  }
  if (r.chunk_bytes() == 0) return DataLoss(what + ": chunk size 0");
  const uint64_t chunks = r.bytes() == 0 ? 1 : (r.bytes() - 1) / r.chunk_bytes() + 1;
  if (static_cast<uint64_t>(r.chunk_crcs_size()) != chunks) {
    return DataLoss(what + ": " + std::to_string(r.chunk_crcs_size()) + " CRCs for " + std::to_string(r.bytes()) +
                    " bytes in chunks of " + std::to_string(r.chunk_bytes()));
  }
  return Status::Ok();
}

std::pair<uint64_t, uint64_t> RegionChunk(const proto::RegionCrc& r, int chunk) {
  const uint64_t begin = r.offset() + static_cast<uint64_t>(chunk) * r.chunk_bytes();
  return {begin, begin + std::min(r.chunk_bytes(), r.offset() + r.bytes() - begin)};
}

Status CheckRankLayout(const proto::RankRecord& rank) {
  const uint64_t slot = rank.slot_bytes();
  const std::string what = "catalog record of rank " + std::to_string(rank.rank());
  for (const auto& t : rank.tensors()) {
    if (t.slot_offset() > slot || t.bytes() > slot - t.slot_offset()) {
      return DataLoss(what + ": tensor '" + t.name() + "' of " + std::to_string(t.bytes()) + " bytes at " +
                      std::to_string(t.slot_offset()) + " lies outside the slot of " + std::to_string(slot));
    }
  }
  for (const auto& b : rank.blobs()) {
    if (b.slot_offset() > slot || slot - b.slot_offset() < 8 || b.capacity() > slot - b.slot_offset() - 8) {
      return DataLoss(what + ": blob '" + b.name() + "' of capacity " + std::to_string(b.capacity()) + " at " +
                      std::to_string(b.slot_offset()) + " lies outside the slot of " + std::to_string(slot));
    }
  }
  return Status::Ok();
}

Result<std::unique_ptr<Catalog>> Catalog::Open(const std::string& dir) {
  rocksdb::Options options;
  options.create_if_missing = true;
  options.keep_log_file_num = 2;
  options.max_manifest_file_size = 4 << 20;
  rocksdb::DB* db = nullptr;
  MEMENTO_RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(options, dir, &db), "opening catalog " + dir));
  return std::unique_ptr<Catalog>(new Catalog(dir, db));
}

Catalog::Catalog(std::string dir, rocksdb::DB* db) : dir_(std::move(dir)), db_(db) {}

Catalog::~Catalog() = default;

Status Catalog::Put(const std::string& key, const google::protobuf::MessageLite& value, bool sync) {
  rocksdb::WriteOptions wo;
  wo.sync = sync;
  return FromRocks(db_->Put(wo, key, value.SerializeAsString()), "catalog " + dir_ + " put " + key);
}

Status Catalog::Delete(const std::string& key) {
  rocksdb::WriteOptions wo;
  wo.sync = true;
  return FromRocks(db_->Delete(wo, key), "catalog " + dir_ + " delete " + key);
}

Status Catalog::Scan(const std::string& prefix, std::vector<std::string>* values) {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    values->push_back(it->value().ToString());
  }
  return FromRocks(it->status(), "catalog " + dir_ + " scan " + prefix);
}

Result<proto::NodeRecord> Catalog::GetNode() {
  std::string v;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), "node", &v);
  if (s.IsNotFound()) return NotFound("catalog " + dir_ + " has no node record");
  MEMENTO_RETURN_IF_ERROR(FromRocks(s, "catalog " + dir_ + " get node"));
  proto::NodeRecord rec;
  if (!rec.ParseFromString(v)) return DataLoss("catalog " + dir_ + " holds a malformed node record");
  return rec;
}

Status Catalog::PutNode(const proto::NodeRecord& node) { return Put("node", node); }

Result<std::vector<proto::RankRecord>> Catalog::ListRanks() {
  std::vector<std::string> values;
  MEMENTO_RETURN_IF_ERROR(Scan("rank/", &values));
  return ParseAll<proto::RankRecord>(values, "rank");
}

Status Catalog::PutRank(const proto::RankRecord& rank) { return Put(RankKey(rank.rank()), rank); }
Status Catalog::DeleteRank(int32_t rank) { return Delete(RankKey(rank)); }

Result<std::vector<proto::VersionRecord>> Catalog::ListVersions() {
  std::vector<std::string> values;
  MEMENTO_RETURN_IF_ERROR(Scan("version/", &values));
  return ParseAll<proto::VersionRecord>(values, "version");
}

Status Catalog::PutVersion(const proto::VersionRecord& version, bool sync) {
  return Put(VersionKey(version.step()), version, sync);
}
Status Catalog::DeleteVersion(int64_t step) { return Delete(VersionKey(step)); }

Result<proto::RetiredRecord> Catalog::GetRetired() {
  std::string v;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), "retired", &v);
  if (s.IsNotFound()) return NotFound("catalog " + dir_ + " has no retired layout");
  MEMENTO_RETURN_IF_ERROR(FromRocks(s, "catalog " + dir_ + " get retired"));
  proto::RetiredRecord rec;
  if (!rec.ParseFromString(v)) return DataLoss("catalog " + dir_ + " holds a malformed retired-layout record");
  return rec;
}

Status Catalog::PutRetired(const proto::RetiredRecord& retired) { return Put("retired", retired); }
Status Catalog::DeleteRetired() { return Delete("retired"); }

}  // namespace memento
