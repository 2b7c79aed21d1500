// The agent's catalog: a RocksDB database on node-local disk holding the node record, each rank's
// registration and slots, and every version's state and CRCs. Writes are synced (WAL fsync) so a
// state the agent acted on survives its crash. Thread-safe (RocksDB is).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "proto/memento.pb.h"

namespace rocksdb {
class DB;
}

namespace memento {

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
  Status PutVersion(const proto::VersionRecord& version);
  Status DeleteVersion(int64_t step);

  const std::string& dir() const { return dir_; }

 private:
  Catalog(std::string dir, rocksdb::DB* db);
  Status Put(const std::string& key, const google::protobuf::MessageLite& value);
  Status Delete(const std::string& key);
  Status Scan(const std::string& prefix, std::vector<std::string>* values);

  std::string dir_;
  std::unique_ptr<rocksdb::DB> db_;
};

}  // namespace memento
