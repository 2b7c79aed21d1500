// The agents' side of in-memory resharding, on a CPU machine: ranks speak the agent protocol
// directly (no CUDA needed, the tensors are only declared as CUDA tensors) and write their slots
// themselves. Checks the retirement of the earlier layout, the agreement on the version every node
// holds, the restore reply, the NCCL id relayed between agents, the catalog across an agent crash,
// the drop once the new layout has a version, and the fall-back (with its reason) when a node's
// memory is lost. The NCCL transfer itself is tested on GPUs (tests/snapshot/gpu_reshard_test.cc).
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <atomic>
#include <filesystem>
#include <mutex>
#include <set>

#include "core/shared_memory.h"
#include "integration/harness.h"
#include "proto/memento.pb.h"
#include "proto/shard_convert.h"
#include "proto/version.h"
#include "proto/wire.h"

namespace memento::testing {
namespace {

// One rank over a raw socket.
class RawRank {
 public:
  RawRank(const AgentCluster& cluster, int rank, int world, int node, int local_rank = 0) : rank_(rank) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, cluster.Socket(node).c_str(), sizeof(addr.sun_path) - 1);
    ok_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    proto::Request req;
    proto::Hello* h = req.mutable_hello();
    h->set_protocol_version(kAgentProtocolVersion);
    h->set_job_id(cluster.job());
    h->set_rank(rank);
    h->set_local_rank(local_rank);
    h->set_world_size(world);
    h->set_node_id(node);
    h->set_pid(::getpid());
    auto hello = ok_ ? Call(req) : Result<proto::Reply>(Internal("not connected"));
    ok_ = hello.ok();
    reshard_likely_ = ok_ && hello->hello().reshard_likely();
  }
  ~RawRank() { ::close(fd_); }
  bool ok() const { return ok_; }

  Result<proto::Reply> Call(const proto::Request& req) {
    MEMENTO_RETURN_IF_ERROR(SendFrame(fd_, req));
    proto::Reply reply;
    MEMENTO_RETURN_IF_ERROR(RecvFrame(fd_, &reply));
    if (reply.has_error()) return Status(static_cast<StatusCode>(reply.error().code()), reply.error().message());
    return reply;
  }

  // Registers float tensor "w" with `spec` (declared a CUDA tensor) and blob "rng"; waits for the
  // epoch (all ranks of the job must register: call from one thread per rank).
  // With `await` false, returns once the agent answered the registration (an empty reply).
  Result<proto::AwaitEpochReply> Register(const ShardSpec& spec, int memory_kind = 1, bool await = true) {
    proto::Request req;
    proto::TensorRecord* t = req.mutable_register_request()->add_tensors();
    t->set_name("w");
    t->set_dtype(static_cast<int32_t>(DType::kF32));
    ToProto(spec, t->mutable_spec());
    t->set_bytes(static_cast<uint64_t>(spec.local_numel) * 4);
    t->set_memory_kind(memory_kind);
    proto::BlobRecord* b = req.mutable_register_request()->add_blobs();
    b->set_name("rng");
    b->set_capacity(64);
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply reply, Call(req));
    layout_ = reply.register_reply();
    slots_.clear();
    for (const std::string& name : layout_.slot_names()) {
      MEMENTO_ASSIGN_OR_RETURN(auto seg, SharedMemory::Open(name, layout_.slot_bytes(), true));
      slots_.push_back(std::move(seg));
    }
    if (!await) return proto::AwaitEpochReply();
    proto::Request awaiting;
    awaiting.mutable_await_epoch()->set_timeout_ms(60000);
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply awaited, Call(awaiting));
    return awaited.await_epoch();
  }

  // Captures `step`: w holds FillPattern(rank, step), the blob "rank R step S".
  Status Capture(int64_t step) {
    proto::Request begin;
    begin.mutable_begin_capture()->set_step(step);
    begin.mutable_begin_capture()->set_timeout_ms(60000);
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply r, Call(begin));
    uint8_t* base = slots_.at(static_cast<size_t>(r.begin_capture().slot_index()))->data();
    FillPattern(base + layout_.tensors(0).slot_offset(), layout_.tensors(0).bytes(), PatternSeed(rank_, step, 0));
    const std::string cursor = "rank " + std::to_string(rank_) + " step " + std::to_string(step);
    const uint64_t len = cursor.size();
    std::memcpy(base + layout_.blobs(0).slot_offset(), &len, 8);
    std::memcpy(base + layout_.blobs(0).slot_offset() + 8, cursor.data(), len);
    proto::Request done;
    done.mutable_captured()->set_step(step);
    return Call(done).status();
  }

  bool GloballyComplete(int64_t step) {
    bool failed = false;
    const bool complete = WaitUntil(
        [&] {
          proto::Request req;
          req.mutable_list_versions();
          auto r = Call(req);
          failed = !r.ok();
          if (failed) return true;
          for (const auto& v : r->list_versions().versions()) {
            if (v.step() == step && v.state() == "globally_complete") return true;
          }
          return false;
        },
        30000);
    return complete && !failed;
  }

  Result<proto::RestoreReply> Restore() {
    proto::Request req;
    req.mutable_restore()->set_step(-1);
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply r, Call(req));
    return r.restore();
  }

  // The registration's answer: does the node hold an earlier layout to reshard?
  bool reshard_candidate() const { return layout_.reshard_candidate(); }
  // The handshake's hint that it may.
  bool reshard_likely() const { return reshard_likely_; }
  std::vector<std::string> slot_names() const { return {layout_.slot_names().begin(), layout_.slot_names().end()}; }

  Result<std::string> NcclId(const std::string& id) {
    proto::Request req;
    req.mutable_nccl_id()->set_id(id);
    req.mutable_nccl_id()->set_timeout_ms(30000);
    MEMENTO_ASSIGN_OR_RETURN(proto::Reply r, Call(req));
    return r.nccl_id().id();
  }

 private:
  int fd_ = -1;
  int rank_ = 0;
  bool ok_ = false;
  bool reshard_likely_ = false;
  proto::RegisterReply layout_;
  std::vector<std::unique_ptr<SharedMemory>> slots_;
};

ShardSpec Rows(int rank) { return SplitEvenly({4, 1024}, 0, 2, rank).value(); }
ShardSpec Columns(int rank) { return SplitEvenly({4, 1024}, 1, 2, rank).value(); }

// Two nodes, rank r on node r, saving steps 1 and 2 in rows; the job then ends.
void SaveInRows(const AgentCluster& cluster) {
  RunRanks(2, [&](int r) {
    RawRank rank(cluster, r, 2, r);
    ASSERT_TRUE(rank.ok());
    EXPECT_FALSE(rank.reshard_likely());
    auto epoch = rank.Register(Rows(r));
    ASSERT_TRUE(epoch.ok()) << epoch.status().ToString();
    EXPECT_FALSE(rank.reshard_candidate());  // the first layout: nothing earlier
    ASSERT_TRUE(rank.Capture(1).ok());
    ASSERT_TRUE(rank.Capture(2).ok());
    ASSERT_TRUE(rank.GloballyComplete(2));
  });
}

bool ShmExists(const std::string& name) {
  struct stat st {};
  return ::stat(("/dev/shm" + name).c_str(), &st) == 0;
}

// The slot segments of node `node` of `job` in /dev/shm (names as shm_open takes them).
std::set<std::string> NodeSlots(const std::string& job, int node) {
  const std::string prefix = "memento-" + job + "-n" + std::to_string(node) + "-r";
  std::set<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm")) {
    const std::string f = e.path().filename().string();
    if (f.rfind(prefix, 0) == 0) out.insert("/" + f);
  }
  return out;
}

TEST(RetiredLayoutTest, ANewLayoutOfCudaRanksReshardsTheVersionEveryNodeHolds) {
  AgentCluster cluster(UniqueJob("retired"), 2);
  cluster.Start();
  SaveInRows(cluster);
  std::mutex mu;
  std::vector<proto::RestoreReply> replies(2);
  std::vector<std::string> ids(2);
  auto restart_in_columns = [&](bool capture) {
    RunRanks(2, [&](int r) {
      RawRank rank(cluster, r, 2, r);
      ASSERT_TRUE(rank.ok());
      EXPECT_TRUE(rank.reshard_likely());  // versions of CUDA ranks in memory (or retired ones)
      auto epoch = rank.Register(Columns(r));
      ASSERT_TRUE(epoch.ok()) << epoch.status().ToString();
      EXPECT_TRUE(rank.reshard_candidate());  // the node holds the rows, retired
      EXPECT_EQ(epoch->restore_point(), 2);
      auto reply = rank.Restore();
      ASSERT_TRUE(reply.ok()) << reply.status().ToString();
      // Rank 0's id reaches rank 1 through the agents' agreement rounds.
      auto id = rank.NcclId(r == 0 ? std::string("id-of-rank-0") : std::string());
      ASSERT_TRUE(id.ok()) << id.status().ToString();
      {
        std::lock_guard<std::mutex> lock(mu);
        replies[r] = *reply;
        ids[r] = *id;
      }
      if (capture) {
        ASSERT_TRUE(rank.Capture(3).ok());
        ASSERT_TRUE(rank.GloballyComplete(3));
      }
    });
  };
  // The retired rank keeps the slots of versions 1 and 2; the others were released.
  auto held_slots = [](const proto::RankRecord& old) {
    int held = 0;
    for (const std::string& name : old.slot_names()) held += name.empty() ? 0 : 1;
    return held;
  };
  restart_in_columns(false);
  EXPECT_TRUE(cluster.LogHas("retiring versions 1, 2 of the earlier layout for in-memory resharding"));
  EXPECT_TRUE(cluster.LogHas("version 2 of the earlier layout (world size 2) is in memory on every node"));
  for (int r = 0; r < 2; ++r) {
    const proto::RestoreReply& rr = replies[r];
    EXPECT_EQ(rr.step(), 2);
    EXPECT_EQ(rr.source(), "memory (resharded from world size 2)");
    ASSERT_TRUE(rr.has_memory_reshard());
    const proto::MemoryReshard& m = rr.memory_reshard();
    EXPECT_EQ(m.step(), 2);
    EXPECT_EQ(m.old_world_size(), 2);
    ASSERT_EQ(m.old_ranks_size(), 1);
    EXPECT_EQ(m.old_ranks(0).rank(), r);
    ASSERT_EQ(m.new_ranks_size(), 1);
    EXPECT_EQ(m.new_ranks(0), r);
    EXPECT_GT(m.old_ranks(0).slot_names_size(), 2);
    EXPECT_EQ(held_slots(m.old_ranks(0)), 2);
    // The retired slot the reply names holds what old rank r captured at step 2.
    const proto::RankRecord& old = m.old_ranks(0);
    auto seg = SharedMemory::Open(old.slot_names(m.slot_index()), old.slot_bytes(), false);
    ASSERT_TRUE(seg.ok()) << seg.status().ToString();
    std::vector<uint8_t> want(old.tensors(0).bytes());
    FillPattern(want.data(), want.size(), PatternSeed(r, 2, 0));
    EXPECT_EQ(std::memcmp((*seg)->data() + old.tensors(0).slot_offset(), want.data(), want.size()), 0);
    EXPECT_EQ(ids[r], "id-of-rank-0");
  }
  const std::string retired_slot = replies[0].memory_reshard().old_ranks(0).slot_names(0);
  ASSERT_TRUE(ShmExists(retired_slot));

  // An agent crash: the retired layout survives in the catalog and shared memory.
  cluster.Kill();
  cluster.Start();
  restart_in_columns(true);
  EXPECT_TRUE(cluster.LogHas("re-attached the retired layout of world size 2: 1 ranks, 2 versions"));
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(replies[r].has_memory_reshard()) << "rank " << r;
    EXPECT_EQ(held_slots(replies[r].memory_reshard().old_ranks(0)), 2);  // re-attached as they were
  }
  // Step 3 of the new layout is globally complete: the retired layout is gone.
  EXPECT_TRUE(cluster.LogHas(
      "dropping the retired layout (world size 2, versions 1, 2): a version of the new layout is globally complete"));
  WaitUntil([&] { return !ShmExists(retired_slot); }, 5000);
  EXPECT_FALSE(ShmExists(retired_slot));
  // The next restart in columns has nothing earlier to reshard: no set-up ahead (the handshake's
  // hint cannot tell the layout, the registration can).
  RunRanks(2, [&](int r) {
    RawRank rank(cluster, r, 2, r);
    ASSERT_TRUE(rank.ok());
    EXPECT_TRUE(rank.reshard_likely());
    auto epoch = rank.Register(Columns(r));
    ASSERT_TRUE(epoch.ok()) << epoch.status().ToString();
    EXPECT_FALSE(rank.reshard_candidate());
    EXPECT_EQ(epoch->restore_point(), 3);
  });
}

// The new layout's slots are the retired layout's empty ones where it can: no memory reserved anew
// (zeroed) while as much is freed.
TEST(RetiredLayoutTest, TheNewLayoutTakesTheEarlierLayoutsEmptySlots) {
  AgentCluster cluster(UniqueJob("retiredspare"), 2);
  cluster.Start();
  SaveInRows(cluster);  // steps 1 and 2 in two of each rank's three slots
  std::vector<std::set<std::string>> before = {NodeSlots(cluster.job(), 0), NodeSlots(cluster.job(), 1)};
  std::mutex mu;
  std::vector<std::vector<std::string>> taken(2);
  std::vector<proto::RestoreReply> replies(2);
  RunRanks(2, [&](int r) {
    RawRank rank(cluster, r, 2, r);
    ASSERT_TRUE(rank.ok());
    auto epoch = rank.Register(Columns(r));
    ASSERT_TRUE(epoch.ok()) << epoch.status().ToString();
    auto reply = rank.Restore();
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    std::lock_guard<std::mutex> lock(mu);
    taken[r] = rank.slot_names();
    replies[r] = *reply;
  });
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("node " + std::to_string(r));
    ASSERT_EQ(before[r].size(), 3u);
    ASSERT_TRUE(replies[r].has_memory_reshard());
    std::set<std::string> retired;
    for (const std::string& n : replies[r].memory_reshard().old_ranks(0).slot_names()) {
      if (!n.empty()) retired.insert(n);
    }
    ASSERT_EQ(retired.size(), 2u);
    std::set<std::string> empty_before;  // the old slot that held no version
    for (const std::string& n : before[r]) {
      if (!retired.count(n)) empty_before.insert(n);
    }
    ASSERT_EQ(empty_before.size(), 1u);
    ASSERT_EQ(taken[r].size(), 3u);
    EXPECT_EQ(taken[r][0], *empty_before.begin());  // the spare is the new layout's first slot
    std::set<std::string> now = retired;
    now.insert(taken[r].begin(), taken[r].end());
    EXPECT_EQ(now.size(), 5u);                        // no name shared by two slots
    EXPECT_EQ(NodeSlots(cluster.job(), r), now);      // and nothing else in /dev/shm
  }
}

// A node whose new layout has fewer ranks: they take what they need of the spares, and the rest
// is released once the new layout's epoch opens.
TEST(RetiredLayoutTest, SparesTheNewLayoutDoesNotTakeAreReleased) {
  AgentCluster cluster(UniqueJob("retiredfewer"), 1);
  cluster.Start();
  // World size 2 on one node in rows, step 1 only: each rank holds one version, two empty slots.
  RunRanks(2, [&](int r) {
    RawRank rank(cluster, r, 2, 0, /*local_rank=*/r);
    ASSERT_TRUE(rank.ok());
    auto epoch = rank.Register(Rows(r));
    ASSERT_TRUE(epoch.ok()) << epoch.status().ToString();
    ASSERT_TRUE(rank.Capture(1).ok());
    ASSERT_TRUE(rank.GloballyComplete(1));
  });
  const std::set<std::string> before = NodeSlots(cluster.job(), 0);
  ASSERT_EQ(before.size(), 6u);
  // World size 1, the whole tensor, twice the bytes: three of the four spares grow into its slots.
  RawRank rank(cluster, 0, 1, 0);
  ASSERT_TRUE(rank.ok());
  EXPECT_TRUE(rank.reshard_likely());
  auto epoch = rank.Register(SplitEvenly({4, 1024}, 0, 1, 0).value());
  ASSERT_TRUE(epoch.ok()) << epoch.status().ToString();
  EXPECT_TRUE(rank.reshard_candidate());
  EXPECT_EQ(epoch->restore_point(), 1);
  const std::vector<std::string> taken = rank.slot_names();
  ASSERT_EQ(taken.size(), 3u);
  for (const std::string& n : taken) EXPECT_TRUE(before.count(n)) << n << " is not one of the old slots";
  EXPECT_TRUE(cluster.LogHas("released 1 spare slots (12.0 KiB) of the retired layout: the new layout's ranks all "
                             "registered"))
      << cluster.Log();
  // Left: the two retired slots holding step 1 and the new rank's three.
  EXPECT_EQ(NodeSlots(cluster.job(), 0).size(), 5u);
}

// Two ranks of one node that claim the same local rank, registering at once (one may be making
// its slots outside the agent's lock while the other registers): one of them is refused.
TEST(RegistrationTest, TwoRanksClaimingOneLocalRankAreRefused) {
  AgentCluster cluster(UniqueJob("localrank"), 1);
  cluster.Start();
  std::vector<Status> out(2);
  std::atomic<int> answered{0};
  RunRanks(2, [&](int r) {
    RawRank rank(cluster, r, 2, 0, /*local_rank=*/0);
    ASSERT_TRUE(rank.ok());
    out[r] = rank.Register(Rows(r), 1, /*await=*/false).status();
    ++answered;
    while (answered.load() < 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));  // both stay connected
  });
  ASSERT_NE(out[0].ok(), out[1].ok()) << out[0].ToString() << " / " << out[1].ToString();
  const int refused = out[0].ok() ? 1 : 0;
  EXPECT_EQ(out[refused].code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(out[refused].message(), "rank " + std::to_string(refused) + ": local rank 0 is already taken by rank " +
                                        std::to_string(1 - refused));
}

TEST(RetiredLayoutTest, ALostNodeLeavesNothingToReshardAndTheRestoreSaysWhy) {
  AgentCluster cluster(UniqueJob("retiredloss"), 2);
  cluster.Start();
  SaveInRows(cluster);
  cluster.Kill();
  cluster.WipeNode(1);  // node 1's memory and catalog are gone with old rank 1
  cluster.Start();
  std::mutex mu;
  std::vector<std::string> errors(2);
  RunRanks(2, [&](int r) {
    RawRank rank(cluster, r, 2, r);
    ASSERT_TRUE(rank.ok());
    auto epoch = rank.Register(Columns(r));
    ASSERT_TRUE(epoch.ok()) << epoch.status().ToString();
    // Node 0 holds its half of the rows (a candidate until the agreement says otherwise); node 1
    // holds nothing.
    EXPECT_EQ(rank.reshard_candidate(), r == 0);
    EXPECT_EQ(epoch->restore_point(), -1);
    auto reply = rank.Restore();
    ASSERT_FALSE(reply.ok());
    std::lock_guard<std::mutex> lock(mu);
    errors[r] = reply.status().ToString();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(errors[r].find("no globally complete version to restore on node " + std::to_string(r) +
                             "; the earlier layout's versions in memory cannot be resharded: the nodes hold 1 of "
                             "its 2 ranks (the others' memory was lost)"),
              std::string::npos)
        << errors[r];
  }
  EXPECT_TRUE(cluster.LogHas("retiring versions 1, 2 of the earlier layout"));
}

TEST(RetiredLayoutTest, HostRanksOfANewLayoutAreRefusedWhileOnlyMemoryHoldsAVersion) {
  AgentCluster cluster(UniqueJob("retiredhost"), 2);
  cluster.Start();
  SaveInRows(cluster);
  RawRank rank(cluster, 0, 2, 0);
  ASSERT_TRUE(rank.ok());
  auto epoch = rank.Register(Columns(0), /*memory_kind=*/0);
  ASSERT_FALSE(epoch.ok());
  EXPECT_EQ(epoch.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(epoch.status().message(),
            "rank 0: registration differs from the saved layout: 'w' differs from the saved one (dtype, shape, spec "
            "or size); versions 1, 2 of the saved layout are only in this node's memory (newest in storage: -1). "
            "Restart with the saved layout to restore them, or start the agents afresh (a new catalog) to resume "
            "from storage in the new layout");
}

}  // namespace
}  // namespace memento::testing
