// Erasure coding of this node's snapshots across its parity group (DESIGN §5), over the agents'
// communicator: encoding by partial parities combined with an XOR reduce-scatter, and rebuilding
// lost members' data and parity from the survivors. Byte layout: erasure/stripe.h.
// Thread-compatible: Encode is called from one thread (the encoder), Rebuild from another (the
// agreement thread, at job start); each uses its own communicator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/communicator.h"
#include "core/status.h"
#include "erasure/codec.h"
#include "erasure/scheme.h"
#include "erasure/stripe.h"

namespace memento {

// One version's bytes on this node: its local ranks' slots concatenated in rank order, read and
// written as one virtual buffer (zeros past its end, as the stripe layout pads it).
class NodeData {
 public:
  void Add(uint8_t* data, size_t bytes);
  size_t size() const { return size_; }
  void Read(size_t offset, size_t len, uint8_t* dst) const;
  void Write(size_t offset, size_t len, const uint8_t* src);
  // The bytes [offset, offset + len) when they lie in one region (no copy needed), else null.
  uint8_t* Span(size_t offset, size_t len) const;

 private:
  struct Region {
    uint8_t* data;
    size_t bytes;
  };
  std::vector<Region> regions_;
  size_t size_ = 0;
};

class ParityGroup {
 public:
  // Forms the groups (collective over `world`): consecutive positions of `group_size` agents,
  // spread over failure domains when `domains` (position -> domain) is not empty.
  static Result<std::unique_ptr<ParityGroup>> Create(const Scheme& scheme, int group_size, Communicator* world,
                                                     const std::vector<std::string>& domains);

  const Scheme& scheme() const { return layout_.scheme(); }
  int index() const { return index_; }                   // this node's index in its group
  const std::vector<int>& members() const { return members_; }  // world positions, by index
  int group_id() const { return group_id_; }
  // Every group of the job (world positions), identical on every agent.
  const std::vector<std::vector<int>>& all_groups() const { return all_groups_; }
  size_t PaddedLength(size_t bytes) const { return layout_.PaddedLength(bytes); }
  size_t ParityLength(size_t padded) const { return layout_.ParityLength(padded); }
  const StripeLayout& layout() const { return layout_; }

  // Collective over the group: computes this node's parity (ParityLength(padded) bytes) of the
  // version whose bytes are `data`, padded to `padded` (equal on every member).
  Status Encode(const NodeData& data, size_t padded, uint8_t* parity);
  // The same parity, by sending each data segment to the stripe's parity holders, which compute
  // their rows (point-to-point instead of a reduce-scatter). Collective over the group.
  Status EncodeToHolders(const NodeData& data, size_t padded, uint8_t* parity);
  // How survivors get a lost member's bytes to it.
  //   kGather: each of a stripe's k sources sends its segment to the lost member, which decodes:
  //            the lost member receives k bytes per byte it rebuilds.
  //   kChain:  the k sources pass a running sum along a chain, each adding its share of the
  //            decode (DecodePlan::ApplyUpdate), and the last sends the result: the lost member
  //            receives one byte per byte it rebuilds, and decodes nothing.
  //   kAuto:   kChain when a stripe has more than one data segment (k > 1), else kGather (the same
  //            for k = 1).
  enum class RebuildMethod { kAuto, kGather, kChain };
  // Collective over the group: the members whose indices are in `lost` rebuild their data and
  // parity of one version from the survivors; survivors send what is needed. With more than m
  // lost, FailedPrecondition and nothing is written. Every member passes the same method.
  Status Rebuild(const std::vector<int>& lost, NodeData* data, uint8_t* parity, size_t padded,
                 RebuildMethod method = RebuildMethod::kAuto);

  // Segment bytes handled per round trip (default 8 MiB, a multiple of 64): bounds the memory of
  // encoding and rebuilding. Tests make it small to run many windows over little data.
  void set_window_bytes(size_t bytes) { window_ = bytes; }

  // Collective over the group (encoder communicator): every member's `mine`, by member index.
  Status ShareBlobs(const std::string& mine, std::vector<std::string>* all);
  // Collective over the group (rebuild communicator): each lost member receives `blob_of(itself)`
  // from the first survivor; survivors pass what they keep for that member.
  Status SendToLost(const std::vector<int>& lost, const std::function<std::string(int)>& blob_of, std::string* mine);

 private:
  ParityGroup(StripeLayout layout, std::unique_ptr<Codec> codec, std::vector<int> members, int index, int group_id,
              std::vector<std::vector<int>> all_groups, std::unique_ptr<Communicator> encode_comm,
              std::unique_ptr<Communicator> rebuild_comm)
      : layout_(std::move(layout)), codec_(std::move(codec)), members_(std::move(members)), index_(index),
        group_id_(group_id), all_groups_(std::move(all_groups)), encode_comm_(std::move(encode_comm)),
        rebuild_comm_(std::move(rebuild_comm)) {}

  struct StripePlan;
  Result<std::vector<StripePlan>> PlanRebuild(const std::vector<int>& lost) const;
  Status RebuildGather(const std::vector<int>& lost, NodeData* data, uint8_t* parity, size_t padded);
  Status RebuildChain(const std::vector<int>& lost, NodeData* data, uint8_t* parity, size_t padded);
  // The member behind codec index c (0..k-1 data, k.. parity) of stripe s.
  int MemberOf(int stripe, int c) const;

  StripeLayout layout_;
  size_t window_ = size_t{8} << 20;
  std::unique_ptr<Codec> codec_;
  std::vector<int> members_;
  int index_;
  int group_id_;
  std::vector<std::vector<int>> all_groups_;
  std::unique_ptr<Communicator> encode_comm_;
  std::unique_ptr<Communicator> rebuild_comm_;
};

}  // namespace memento
