// Codec: every scheme is a linear map over GF(2^8) given by its generator matrix; ISA-L applies
// the maps, with a plain XOR/copy path where every coefficient is 1 (xor, replicate).
#include "erasure/codec.h"

#include <isa-l/erasure_code.h>

#include <algorithm>
#include <cassert>
#include <cstring>
#include <string>

#include "erasure/isal_error.h"

namespace memento {
namespace erasure_internal {

// out[r] = sum over c of coef[r * cols + c] * in[c], byte by byte. Immutable; thread-safe.
class LinearMap {
 public:
  LinearMap(int rows, int cols, std::vector<uint8_t> coef)
      : rows_(rows), cols_(cols), coef_(std::move(coef)) {
    ones_ = std::all_of(coef_.begin(), coef_.end(), [](uint8_t c) { return c == 1; });
    if (!ones_) {
      tables_.resize(size_t{32} * rows_ * cols_);
      ec_init_tables(cols_, rows_, coef_.data(), tables_.data());
    }
  }

  void Apply(const uint8_t* const* in, uint8_t* const* out, size_t len) const {
    if (ones_) return ApplyOnes(in, out, len);
    std::vector<unsigned char*> src(cols_), dst(rows_);
    for (size_t off = 0; off < len; off += kMaxIsalLen) {
      const size_t n = std::min(kMaxIsalLen, len - off);
      for (int c = 0; c < cols_; ++c) src[c] = const_cast<uint8_t*>(in[c]) + off;
      for (int r = 0; r < rows_; ++r) dst[r] = out[r] + off;
      ec_encode_data(static_cast<int>(n), cols_, rows_, Tables(), src.data(), dst.data());
    }
  }

  void ApplyUpdate(int col, const uint8_t* in, uint8_t* const* out, size_t len) const {
    assert(col >= 0 && col < cols_);
    if (ones_) {
      for (int r = 0; r < rows_; ++r) XorInto(out[r], in, len);
      return;
    }
    std::vector<unsigned char*> dst(rows_);
    for (size_t off = 0; off < len; off += kMaxIsalLen) {
      const size_t n = std::min(kMaxIsalLen, len - off);
      for (int r = 0; r < rows_; ++r) dst[r] = out[r] + off;
      ec_encode_data_update(static_cast<int>(n), cols_, rows_, col, Tables(), const_cast<uint8_t*>(in) + off,
                            dst.data());
    }
  }

 private:
  // ISA-L takes lengths as int: longer buffers go through in pieces of 1 GiB.
  static constexpr size_t kMaxIsalLen = size_t{1} << 30;
  // The XOR path works block by block so that the output stays in cache while sources stream.
  static constexpr size_t kXorBlock = size_t{32} << 10;

  // ISA-L reads the tables but its prototypes take them non-const.
  unsigned char* Tables() const { return const_cast<unsigned char*>(tables_.data()); }

  static void XorInto(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src, size_t len) {
    for (size_t i = 0; i < len; ++i) dst[i] ^= src[i];
  }

  // Every row is the XOR of all inputs: compute row 0 block by block, copy it to the others.
  void ApplyOnes(const uint8_t* const* in, uint8_t* const* out, size_t len) const {
    for (size_t off = 0; off < len; off += kXorBlock) {
      const size_t n = std::min(kXorBlock, len - off);
      std::memcpy(out[0] + off, in[0] + off, n);
      for (int c = 1; c < cols_; ++c) XorInto(out[0] + off, in[c] + off, n);
      for (int r = 1; r < rows_; ++r) std::memcpy(out[r] + off, out[0] + off, n);
    }
  }

  int rows_;
  int cols_;
  std::vector<uint8_t> coef_;
  bool ones_ = false;
  std::vector<unsigned char> tables_;  // ec_init_tables output, 32 bytes per coefficient
};

}  // namespace erasure_internal

using erasure_internal::LinearMap;

void DecodePlan::Apply(const uint8_t* const* sources, uint8_t* const* outputs, size_t len) const {
  if (map_ != nullptr) map_->Apply(sources, outputs, len);
}

void DecodePlan::ApplyUpdate(int source_index, const uint8_t* source, uint8_t* const* outputs,
                             size_t len) const {
  if (map_ != nullptr) map_->ApplyUpdate(source_index, source, outputs, len);
}

Result<std::unique_ptr<Codec>> Codec::Create(const Scheme& scheme, int k) {
  const std::string name = scheme.ToString();
  if (k < 1) return InvalidArgument("codec " + name + ": k must be at least 1, got " + std::to_string(k));
  const int m = scheme.m;
  switch (scheme.kind) {
    case Scheme::Kind::kNone:
      return InvalidArgument("scheme none has no codec: it keeps no redundancy");
    case Scheme::Kind::kXor:
      if (m != 1) return InvalidArgument("invalid scheme: xor with m = " + std::to_string(m) + " (xor has m = 1)");
      break;
    case Scheme::Kind::kReplicate:
    case Scheme::Kind::kReedSolomon:
      if (m < 1 || m > Scheme::kMaxParity) {
        return InvalidArgument("invalid scheme " + name + ": m = " + std::to_string(m) + " is outside 1.." +
                               std::to_string(Scheme::kMaxParity));
      }
      break;
  }
  if (scheme.kind == Scheme::Kind::kReplicate && k != 1) {
    return InvalidArgument("codec " + name + " copies whole segments: k must be 1, got " + std::to_string(k));
  }
  if (k + m > 256) {
    return InvalidArgument("codec " + name + " with k = " + std::to_string(k) +
                           ": k + m must be at most 256 in GF(2^8)");
  }

  std::vector<uint8_t> generator(static_cast<size_t>(k + m) * k, 0);
  if (scheme.kind == Scheme::Kind::kReedSolomon) {
    gf_gen_cauchy1_matrix(generator.data(), k + m, k);
  } else {
    for (int i = 0; i < k; ++i) generator[static_cast<size_t>(i) * k + i] = 1;
    std::fill(generator.begin() + static_cast<ptrdiff_t>(k) * k, generator.end(), uint8_t{1});
  }
  return std::unique_ptr<Codec>(new Codec(scheme, k, std::move(generator)));
}

Codec::Codec(const Scheme& scheme, int k, std::vector<uint8_t> generator)
    : scheme_(scheme), k_(k), generator_(std::move(generator)) {
  encode_ = std::make_shared<LinearMap>(
      m(), k_, std::vector<uint8_t>(generator_.begin() + static_cast<ptrdiff_t>(k_) * k_, generator_.end()));
}

Codec::~Codec() = default;

void Codec::Encode(const uint8_t* const* data, uint8_t* const* parity, size_t len) const {
  encode_->Apply(data, parity, len);
}

void Codec::EncodeUpdate(int data_index, const uint8_t* data, uint8_t* const* parity, size_t len) const {
  encode_->ApplyUpdate(data_index, data, parity, len);
}

Result<DecodePlan> Codec::PlanDecode(const std::vector<int>& erased) const {
  const int n = k_ + m();
  std::vector<bool> is_erased(n, false);
  for (int e : erased) {
    if (e < 0 || e >= n) {
      return InvalidArgument("codec " + scheme_.ToString() + ": erased segment " + std::to_string(e) +
                             " is outside 0.." + std::to_string(n - 1) + " (k = " + std::to_string(k_) +
                             ", m = " + std::to_string(m()) + ")");
    }
    if (is_erased[e]) {
      return InvalidArgument("codec " + scheme_.ToString() + ": erased segment " + std::to_string(e) +
                             " is listed twice");
    }
    is_erased[e] = true;
  }
  if (static_cast<int>(erased.size()) > m()) {
    return FailedPrecondition("cannot decode: " + std::to_string(erased.size()) + " erasures, scheme " +
                              scheme_.ToString() + " tolerates " + std::to_string(m()));
  }

  DecodePlan plan;
  for (int i = 0; i < n; ++i) {
    if (is_erased[i]) plan.erased_.push_back(i);
  }
  if (plan.erased_.empty()) return plan;
  for (int i = 0; i < n && static_cast<int>(plan.sources_.size()) < k_; ++i) {
    if (!is_erased[i]) plan.sources_.push_back(i);
  }

  // The sources' generator rows B satisfy B * data = sources, so data = B^-1 * sources; an erased
  // parity row g gives parity = g * B^-1 * sources.
  const size_t kk = static_cast<size_t>(k_);
  std::vector<uint8_t> b(kk * kk), b_inv(kk * kk);
  for (size_t r = 0; r < kk; ++r) {
    std::copy_n(generator_.begin() + static_cast<ptrdiff_t>(plan.sources_[r] * kk), kk, b.begin() + r * kk);
  }
  MEMENTO_ISAL_CHECK(gf_invert_matrix(b.data(), b_inv.data(), k_),
                     "codec " + scheme_.ToString() + ": generator rows of the survivors are singular");
  std::vector<uint8_t> coef(plan.erased_.size() * kk, 0);
  for (size_t e = 0; e < plan.erased_.size(); ++e) {
    const size_t row = static_cast<size_t>(plan.erased_[e]);
    uint8_t* out = coef.data() + e * kk;
    if (row < kk) {
      std::copy_n(b_inv.begin() + static_cast<ptrdiff_t>(row * kk), kk, out);
      continue;
    }
    const uint8_t* g = generator_.data() + row * kk;
    for (size_t c = 0; c < kk; ++c) {
      uint8_t sum = 0;
      for (size_t j = 0; j < kk; ++j) sum ^= gf_mul(g[j], b_inv[j * kk + c]);
      out[c] = sum;
    }
  }
  plan.map_ = std::make_shared<LinearMap>(static_cast<int>(plan.erased_.size()), k_, std::move(coef));
  return plan;
}

Status Codec::Decode(uint8_t* const* segments, const std::vector<int>& erased, size_t len) const {
  MEMENTO_ASSIGN_OR_RETURN(DecodePlan plan, PlanDecode(erased));
  std::vector<const uint8_t*> sources;
  std::vector<uint8_t*> outputs;
  for (int s : plan.sources()) sources.push_back(segments[s]);
  for (int e : plan.erased()) outputs.push_back(segments[e]);
  plan.Apply(sources.data(), outputs.data(), len);
  return Status::Ok();
}

}  // namespace memento
