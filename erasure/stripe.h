// StripeLayout: how one group's bytes are cut into rotated stripes (SCR style, DESIGN.md §5), and
// the whole-group encode and rebuild in one process that the MPI pipeline reproduces.
// docs/erasure.md walks through N = 4, m = 2. Thread safety: StripeLayout is an immutable value;
// the free functions write only the buffers they are given.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "core/status.h"
#include "erasure/codec.h"
#include "erasure/scheme.h"

namespace memento {

// Members are a group's positions 0..N-1 (MakeGroups' order). Every member pads its data to the
// same length L (PaddedLength of the largest member's data, agreed by the group) and stores
// ParityLength(L) bytes of parity in m slots of SegmentLength(L) bytes.
//
// rs:m and xor (k = N - m): member i's data is cut into k segments of S = L / k bytes. Stripe
// s = 0..N-1 has parity holders (s + j) mod N for j = 0..m-1, and data from the other k members:
// ContributorsOf(s)[t] = (s + m + t) mod N gives its segment t, which is data index t for the
// codec. Each member contributes to k stripes (one segment each) and holds parity for m.
//
// replicate:r (m = r - 1, k = 1): nothing is cut; stripe s is member s's whole data (S = L) and
// its holders are the next m members, (s + 1 + j) mod N, each keeping a copy.
//
// Either way, parity j of stripe s lives in slot j of member HolderIndex(s, j), at byte j * S of
// its parity buffer; a member's slots, in order, are ParityHeldBy(member).
class StripeLayout {
 public:
  // Bytes every segment length is a multiple of: aligned, vector-friendly kernels.
  static constexpr size_t kAlignment = 64;

  // The layout of a group of `group_size` members. InvalidArgument for none, or when the group is
  // too small: rs:m and xor need N >= m + 1, replicate:r needs N >= r.
  static Result<StripeLayout> Create(const Scheme& scheme, int group_size);

  const Scheme& scheme() const { return scheme_; }
  int group_size() const { return n_; }  // N: members, and stripes
  int k() const { return k_; }           // data segments per stripe = segments per member's data
  int m() const { return scheme_.m; }    // parity slots per stripe and per member

  // L: `data_bytes` (the largest member's data) rounded up to a multiple of k * kAlignment.
  size_t PaddedLength(size_t data_bytes) const;
  // S = L / k; `padded_length` must come from PaddedLength.
  size_t SegmentLength(size_t padded_length) const { return padded_length / k_; }
  // m * S: the parity bytes each member stores.
  size_t ParityLength(size_t padded_length) const { return SegmentLength(padded_length) * m(); }

  // The member holding parity j (0 <= j < m) of `stripe`.
  int HolderIndex(int stripe, int j) const;
  // The members whose segments form `stripe`, in codec data order 0..k-1.
  std::vector<int> ContributorsOf(int stripe) const;
  // Which of `member`'s segments goes to `stripe`: also its codec data index there. -1 when the
  // member gives nothing to the stripe (a holder; or, under replicate, anyone but its owner).
  int SegmentOf(int member, int stripe) const;
  // The (stripe, j) of each parity slot `member` stores, slot order: entry j is (stripe, j).
  std::vector<std::pair<int, int>> ParityHeldBy(int member) const;

  // OK when the group can rebuild the members `lost` (indices 0..N-1) from the others: at most m
  // lost for rs and xor; for replicate, no stripe may lose its owner and every copy (so more than
  // m losses are survivable when they are not adjacent). FailedPrecondition "cannot rebuild: 3 of
  // 6 members lost (0, 1, 2), scheme rs:2 tolerates 2" otherwise; InvalidArgument for an index
  // out of range or listed twice.
  Status CheckRecoverable(const std::vector<int>& lost) const;

 private:
  StripeLayout(const Scheme& scheme, int n, int k) : scheme_(scheme), n_(n), k_(k) {}
  // First holder offset from the stripe: 0 for rs and xor, 1 for replicate (the owner is s).
  int holder_offset() const { return scheme_.kind == Scheme::Kind::kReplicate ? 1 : 0; }

  Scheme scheme_;
  int n_;
  int k_;
};

// Member `member`'s share of the partial-parity encoding, laid out for an XOR reduce-scatter:
// `out` receives N blocks of m * len bytes; block d, slot j holds this member's contribution to
// bytes [offset, offset + len) of member d's parity slot j (zeros where it has none). XOR-ing
// block d over all members gives exactly those bytes of d's parity, so MPI_Reduce_scatter_block
// (MPI_BXOR) with len = S and offset 0 delivers every member its whole parity buffer; smaller
// windows pipeline a large L. `data` is the member's L padded bytes; `codec` must be
// Codec::Create(layout.scheme(), layout.k()). InvalidArgument on a mismatched codec, member out
// of range, or a window outside the segment.
Status EncodePartialParity(const StripeLayout& layout, const Codec& codec, int member, const uint8_t* data,
                           size_t padded_length, size_t offset, size_t len, uint8_t* out);

// The whole group in one process: data[i] is member i's L padded bytes, (*parity)[i] its
// ParityLength(L) bytes. EncodeLocally fills every member's parity (stripe by stripe, as the
// send-to-holder pipeline does). RebuildLocally rewrites the data and parity of the `lost`
// members in place from the others (their buffers must be allocated; their content is ignored):
// the reference that recovery over MPI reproduces. Errors: InvalidArgument for a mismatched
// codec, wrong member count or buffer size; CheckRecoverable's errors before anything is written.
Status EncodeLocally(const StripeLayout& layout, const Codec& codec, const std::vector<std::vector<uint8_t>>& data,
                     std::vector<std::vector<uint8_t>>* parity);
Status RebuildLocally(const StripeLayout& layout, const Codec& codec, const std::vector<int>& lost,
                      std::vector<std::vector<uint8_t>>* data, std::vector<std::vector<uint8_t>>* parity);

}  // namespace memento
