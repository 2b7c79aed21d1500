// The shard model (DESIGN §4): boxes and flat ranges of a global tensor, the fragments of a rank's
// buffer that map onto them, and helpers that build the usual layouts (TP splits, fused
// sub-parameters, ZeRO flat partitions, vocab padding). Value types; thread-compatible.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace memento {

// A box of a global tensor: per dimension, the first index and the length.
struct Box {
  std::vector<int64_t> offsets;
  std::vector<int64_t> lengths;

  int64_t numel() const;
  bool operator==(const Box&) const = default;
};

// A contiguous run of a rank's local buffer that holds either a box of the global tensor (stored
// row-major inside the run) or a flat range of the row-major global tensor (ZeRO partitions).
struct Fragment {
  enum class Kind : int32_t { kBox = 0, kFlat = 1 };

  Kind kind = Kind::kBox;
  int64_t local_offset = 0;  // first element of the run in the local buffer (elements, not bytes)
  Box box;                   // kind == kBox
  int64_t flat_begin = 0;    // kind == kFlat: first element in the row-major global tensor
  int64_t flat_length = 0;   // kind == kFlat: number of elements
  // Data-parallel copies of the same region carry different replica ids; only replica 0 is
  // written to storage, and every replica is redundancy the erasure layer may count on.
  int32_t replica_id = 0;

  int64_t numel() const;
  bool operator==(const Fragment&) const = default;
};

// One rank's share of one tensor.
struct ShardSpec {
  std::vector<int64_t> global_shape;  // logical shape of the whole tensor (padded, when padded)
  std::vector<Fragment> fragments;
  // Elements in the rank's local buffer; at least the end of the last fragment (the rest is
  // padding that is captured but belongs to no fragment).
  int64_t local_numel = 0;
  // Vocab padding: when non-empty, the unpadded global shape. global_shape is the padded one; the
  // rows past original_shape[0] are padding that resharding cuts and re-pads.
  std::vector<int64_t> original_shape;

  bool operator==(const ShardSpec&) const = default;

  // Checks shapes, bounds, that local runs do not overlap, and that no two fragments of this rank
  // cover the same global element. Messages name the fragment index and what is wrong.
  Status Validate() const;
  // Short human-readable form, e.g. "[1024,512] box(0:512,0:512)@0".
  std::string DebugString() const;
};

// Product of the dims (1 for a scalar's empty shape). Does not check for negative dims or overflow;
// ShardSpec::Validate does.
int64_t NumElements(const std::vector<int64_t>& shape);

// "[1024,512]"; "[]" for a scalar.
std::string ShapeString(const std::vector<int64_t>& shape);

// The boxes that together cover exactly the flat range [begin, begin + length) of a row-major
// tensor of `shape`, in ascending row-major order: each box's elements, taken row-major, are a
// contiguous part of the range, and the parts follow each other. At most 2 * rank - 1 boxes; none
// for an empty range. The range must lie inside [0, NumElements(shape)).
std::vector<Box> FlatRangeToBoxes(const std::vector<int64_t>& shape, int64_t begin, int64_t length);

// ---- helpers for the usual layouts ---------------------------------------------------------

// The whole tensor on one rank.
ShardSpec WholeTensor(const std::vector<int64_t>& shape, int32_t replica_id = 0);

// Split along `dim` into parts of the given sizes (uneven allowed); this rank holds part `index`.
Result<ShardSpec> SplitAlongDim(const std::vector<int64_t>& shape, int dim,
                                const std::vector<int64_t>& part_sizes, int index,
                                int32_t replica_id = 0);
// Even split into `parts` parts (the last ones one smaller when `shape[dim] % parts != 0`,
// as torch.tensor_split does).
Result<ShardSpec> SplitEvenly(const std::vector<int64_t>& shape, int dim, int parts, int index,
                              int32_t replica_id = 0);

// A fused parameter (QKV with GQA, gate|up) of `shape`, made of sub-tensors stacked along `dim`
// with sizes `sub_sizes` (summing to shape[dim]); each sub-tensor is split evenly across `parts`
// on its own, and rank `index` holds its slice of every sub-tensor, concatenated along `dim`.
// One box fragment per sub-tensor (zero-length where the rank's slice is empty), at consecutive
// local offsets; each local run holds its box row-major (for dim == 0 that is exactly the
// concatenated buffer).
Result<ShardSpec> FusedSubParamSplit(const std::vector<int64_t>& shape, int dim,
                                     const std::vector<int64_t>& sub_sizes, int parts, int index,
                                     int32_t replica_id = 0);

// ZeRO-style flat partition: parameters `shapes` flattened in order into one group, padded to a
// multiple of `alignment` * `dp` elements, cut into `dp` equal partitions. For rank `dp_index` it
// returns, per parameter, the spec of the part this rank holds (a flat fragment; empty fragments
// when it holds none) and where that part starts inside the rank's partition buffer.
struct FlatPartitionEntry {
  ShardSpec spec;               // local_offset 0, relative to partition_offset
  // Elements from the start of this rank's partition. When the rank holds none of the parameter:
  // where the parameter would start, clamped to [0, partition size].
  int64_t partition_offset = 0;
};
Result<std::vector<FlatPartitionEntry>> ZeroFlatPartition(
    const std::vector<std::vector<int64_t>>& shapes, int dp, int dp_index, int64_t alignment = 1);
// Elements in each rank's partition for the group above; -1 when the arguments are invalid
// (ZeroFlatPartition says why).
int64_t ZeroPartitionSize(const std::vector<std::vector<int64_t>>& shapes, int dp, int64_t alignment = 1);

// A vocabulary-parallel embedding or output layer: `vocab` rows padded up to a multiple of
// `multiple` * `parts`, split evenly along dim 0 across `parts`. Records the original shape.
Result<ShardSpec> VocabPaddedSplit(int64_t vocab, int64_t hidden, int64_t multiple, int parts,
                                   int index, int32_t replica_id = 0);

}  // namespace memento
