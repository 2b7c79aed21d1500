// The agent's catalog: a RocksDB database on node-local disk holding the node record, each rank's
// registration and slots, and every version's state and CRCs. Writes are synced (WAL fsync) so a
// state the agent acted on survives its crash. Thread-safe (RocksDB is).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "proto/memento.pb.h"

namespace rocksdb {
class DB;
}

namespace memento {

// Checks of records read back from the catalog, before the agent reads a slot by them: a damaged
// record fails with DataLoss instead of reading outside the slot (fuzzed by
// tests/fuzz/fuzz_catalog_record.cc).
// A CRC record of a region of a slot (or parity slot) of `slot_bytes`: the region lies inside the
// slot, chunk_bytes > 0, and there is one CRC per chunk of the region (one for an empty region).
Status CheckRegionCrc(const proto::RegionCrc& region, uint64_t slot_bytes);
// The bytes [first, second) of the slot that CRC `chunk` of a checked region covers.
std::pair<uint64_t, uint64_t> RegionChunk(const proto::RegionCrc& region, int chunk);
// A rank's layout: every tensor (`bytes`) and blob (its 8-byte length, then `capacity`) lies inside
// slot_bytes.
Status CheckRankLayout(const proto::RankRecord& rank);

class Catalog {
 public:
  // Opens (creating when missing) the database in `dir`.
  static Result<std::unique_ptr<Catalog>> Open(const std::string& dir);
  ~Catalog();

  // NotFound when absent.
  Result<proto::NodeRecord> GetNode();
  Status PutNode(const proto::NodeRecord& node);

  Result<std::vector<proto::RankRecord>> ListRanks();
  Status PutRank(const proto::RankRecord& rank);
  Status DeleteRank(int32_t rank);

  // Ordered by step.
  Result<std::vector<proto::VersionRecord>> ListVersions();
  // `sync` = false skips the fsync: the record still survives the agent's death (RocksDB has
  // written it to the kernel), only not the machine's, which takes the shared memory with it.
  Status PutVersion(const proto::VersionRecord& version, bool sync = true);
  Status DeleteVersion(int64_t step);

  // The versions of a retired layout (agent/node_state.h); NotFound when there are none.
  Result<proto::RetiredRecord> GetRetired();
  Status PutRetired(const proto::RetiredRecord& retired);
  Status DeleteRetired();

  const std::string& dir() const { return dir_; }

 private:
  Catalog(std::string dir, rocksdb::DB* db);
  Status Put(const std::string& key, const google::protobuf::MessageLite& value, bool sync = true);
  Status Delete(const std::string& key);
  Status Scan(const std::string& prefix, std::vector<std::string>* values);

  std::string dir_;
  std::unique_ptr<rocksdb::DB> db_;
};

}  // namespace memento
