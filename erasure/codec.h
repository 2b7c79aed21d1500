// Codec: encodes one stripe's k data segments into m parity segments and rebuilds any m lost
// ones, for every scheme (replicate:r, xor, rs:m) behind one interface. docs/erasure.md has the
// math. Thread safety: a Codec and a DecodePlan are immutable after creation; every method is
// const and may run on many threads at once (on disjoint output buffers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/status.h"
#include "erasure/scheme.h"

namespace memento {

namespace erasure_internal {
class LinearMap;
}  // namespace erasure_internal

// How to rebuild one erasure pattern of a stripe: which surviving segments are read (sources)
// and the GF(2^8) coefficients that turn them into the erased ones. Made by Codec::PlanDecode.
// Segment indices are the codec's: 0..k-1 data, k..k+m-1 parity.
class DecodePlan {
 public:
  // The erased segments, ascending; outputs[i] below rebuilds erased()[i].
  const std::vector<int>& erased() const { return erased_; }
  // The surviving segments read, ascending (k of them; 1 for replicate); sources[i] below is the
  // buffer of sources()[i]. The other survivors are not needed.
  const std::vector<int>& sources() const { return sources_; }

  // Rebuilds every erased segment: `sources` holds sources().size() buffers of `len` bytes,
  // `outputs` erased().size() buffers of `len` bytes, none overlapping.
  void Apply(const uint8_t* const* sources, uint8_t* const* outputs, size_t len) const;

  // Adds source `source_index`'s share (0 <= source_index < sources().size()) into `outputs`,
  // which the caller zeroed first. XOR-ing the outputs of all sources equals Apply: a rebuild can
  // run as partial products on the surviving nodes combined by an XOR reduce.
  void ApplyUpdate(int source_index, const uint8_t* source, uint8_t* const* outputs, size_t len) const;

 private:
  friend class Codec;
  std::vector<int> erased_;
  std::vector<int> sources_;
  std::shared_ptr<const erasure_internal::LinearMap> map_;  // null when nothing is erased
};

class Codec {
 public:
  // A codec for stripes of `k` data segments under `scheme`:
  //   rs:m        Reed-Solomon over GF(2^8) (polynomial 0x11d), generator from ISA-L's
  //               gf_gen_cauchy1_matrix, so every k x k submatrix is invertible; k + m <= 256.
  //   xor         one parity, the XOR of the k data segments (m = 1).
  //   replicate:r k must be 1: each parity is a full copy of the one data segment (m = r - 1).
  //               A group cuts nothing under replication: every node's data is its own stripe.
  // InvalidArgument for none, k < 1, a scheme whose m does not fit its kind, or k + m > 256.
  static Result<std::unique_ptr<Codec>> Create(const Scheme& scheme, int k);

  ~Codec();
  Codec(const Codec&) = delete;
  Codec& operator=(const Codec&) = delete;

  const Scheme& scheme() const { return scheme_; }
  int k() const { return k_; }  // data segments per stripe
  int m() const { return scheme_.m; }  // parity segments per stripe, and erasures tolerated

  // The (k + m) x k generator matrix, row-major: rows 0..k-1 the identity, row k + j the
  // coefficients of parity j (all ones for xor and replicate).
  const std::vector<uint8_t>& generator() const { return generator_; }

  // parity[j] = sum over i of generator[k + j][i] * data[i], for k data and m parity buffers of
  // `len` bytes each (any len, no alignment needed; parity must not overlap data).
  void Encode(const uint8_t* const* data, uint8_t* const* parity, size_t len) const;

  // Adds data segment `data_index`'s contribution (0 <= data_index < k) into the m `parity`
  // buffers, which the caller zeroed first: a partial parity. XOR-combining the partial parities
  // of all k data segments equals Encode, so nodes can each encode their own segments and combine
  // the results with an XOR reduce-scatter.
  void EncodeUpdate(int data_index, const uint8_t* data, uint8_t* const* parity, size_t len) const;

  // Plans the rebuild of `erased` (segment indices 0..k+m-1, any order). InvalidArgument for an
  // index out of range or listed twice; FailedPrecondition "cannot decode: 3 erasures, scheme
  // rs:2 tolerates 2" for more than m.
  Result<DecodePlan> PlanDecode(const std::vector<int>& erased) const;

  // Rebuilds the `erased` segments in place: `segments` holds k + m buffers of `len` bytes, data
  // 0..k-1 then parity; the erased ones are overwritten, the others only read. Errors as
  // PlanDecode; nothing is written on error.
  Status Decode(uint8_t* const* segments, const std::vector<int>& erased, size_t len) const;

 private:
  Codec(const Scheme& scheme, int k, std::vector<uint8_t> generator);

  Scheme scheme_;
  int k_;
  std::vector<uint8_t> generator_;
  std::shared_ptr<const erasure_internal::LinearMap> encode_;  // the m parity rows
};

}  // namespace memento
