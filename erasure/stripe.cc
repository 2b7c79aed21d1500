// Rotated stripes: index arithmetic, partial parities, and whole-group encode and rebuild.
#include "erasure/stripe.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace memento {
namespace {

int Mod(int a, int n) { return ((a % n) + n) % n; }

std::string JoinIds(const std::vector<int>& ids) {
  std::string s;
  for (int id : ids) s += (s.empty() ? "" : ", ") + std::to_string(id);
  return s;
}

Status CheckCodec(const StripeLayout& layout, const Codec& codec) {
  if (codec.scheme() != layout.scheme() || codec.k() != layout.k()) {
    return InvalidArgument("codec " + codec.scheme().ToString() + " with k = " + std::to_string(codec.k()) +
                           " does not fit the stripe layout " + layout.scheme().ToString() + " with k = " +
                           std::to_string(layout.k()));
  }
  return Status::Ok();
}

// Checks the member count and that every buffer has its expected size.
Status CheckBuffers(const StripeLayout& layout, const std::vector<std::vector<uint8_t>>& data,
                    const std::vector<std::vector<uint8_t>>& parity) {
  const size_t n = static_cast<size_t>(layout.group_size());
  if (data.size() != n || parity.size() != n) {
    return InvalidArgument("group of " + std::to_string(n) + " members given " + std::to_string(data.size()) +
                           " data and " + std::to_string(parity.size()) + " parity buffers");
  }
  const size_t padded = data[0].size();
  if (layout.PaddedLength(padded) != padded) {
    return InvalidArgument("data length " + std::to_string(padded) + " is not padded to a multiple of " +
                           std::to_string(layout.k() * StripeLayout::kAlignment));
  }
  for (size_t i = 0; i < n; ++i) {
    if (data[i].size() != padded || parity[i].size() != layout.ParityLength(padded)) {
      return InvalidArgument("member " + std::to_string(i) + " has " + std::to_string(data[i].size()) +
                             " data and " + std::to_string(parity[i].size()) + " parity bytes; expected " +
                             std::to_string(padded) + " and " + std::to_string(layout.ParityLength(padded)));
    }
  }
  return Status::Ok();
}

// Where the k + m segments of `stripe` (codec order) lie: the data segments in their members'
// data, then the parity slots in their holders' parity; byte offsets within those buffers.
struct SegmentRef {
  int member;
  size_t offset;
};
std::vector<SegmentRef> StripeSegments(const StripeLayout& layout, int stripe, size_t seg) {
  std::vector<SegmentRef> refs;
  for (int member : layout.ContributorsOf(stripe)) {
    refs.push_back({member, static_cast<size_t>(layout.SegmentOf(member, stripe)) * seg});
  }
  for (int j = 0; j < layout.m(); ++j) refs.push_back({layout.HolderIndex(stripe, j), static_cast<size_t>(j) * seg});
  return refs;
}

}  // namespace

Result<StripeLayout> StripeLayout::Create(const Scheme& scheme, int group_size) {
  const std::string name = scheme.ToString();
  switch (scheme.kind) {
    case Scheme::Kind::kNone:
      return InvalidArgument("scheme none has no stripe layout: it keeps no redundancy");
    case Scheme::Kind::kReplicate:
      if (scheme.m < 1 || group_size < scheme.m + 1) {
        return InvalidArgument("scheme " + name + " needs a group of at least " + std::to_string(scheme.m + 1) +
                               " members (every copy on its own node), got " + std::to_string(group_size));
      }
      return StripeLayout(scheme, group_size, 1);
    case Scheme::Kind::kXor:
    case Scheme::Kind::kReedSolomon:
      if (scheme.m < 1 || group_size < scheme.m + 1) {
        return InvalidArgument("scheme " + name + " needs a group of at least " + std::to_string(scheme.m + 1) +
                               " members (m parity holders and a data node per stripe), got " +
                               std::to_string(group_size));
      }
      return StripeLayout(scheme, group_size, group_size - scheme.m);
  }
  return InvalidArgument("unknown scheme kind " + std::to_string(static_cast<int>(scheme.kind)));
}

size_t StripeLayout::PaddedLength(size_t data_bytes) const {
  const size_t unit = static_cast<size_t>(k_) * kAlignment;
  return (data_bytes + unit - 1) / unit * unit;
}

int StripeLayout::HolderIndex(int stripe, int j) const { return Mod(stripe + holder_offset() + j, n_); }

std::vector<int> StripeLayout::ContributorsOf(int stripe) const {
  if (scheme_.kind == Scheme::Kind::kReplicate) return {stripe};
  std::vector<int> members;
  for (int t = 0; t < k_; ++t) members.push_back(Mod(stripe + m() + t, n_));
  return members;
}

int StripeLayout::SegmentOf(int member, int stripe) const {
  if (scheme_.kind == Scheme::Kind::kReplicate) return member == stripe ? 0 : -1;
  const int d = Mod(member - stripe, n_);
  return d < m() ? -1 : d - m();
}

std::vector<std::pair<int, int>> StripeLayout::ParityHeldBy(int member) const {
  std::vector<std::pair<int, int>> slots;
  for (int j = 0; j < m(); ++j) slots.emplace_back(Mod(member - holder_offset() - j, n_), j);
  return slots;
}

Status StripeLayout::CheckRecoverable(const std::vector<int>& lost) const {
  std::vector<bool> is_lost(n_, false);
  for (int member : lost) {
    if (member < 0 || member >= n_) {
      return InvalidArgument("lost member " + std::to_string(member) + " is outside the group 0.." +
                             std::to_string(n_ - 1));
    }
    if (is_lost[member]) return InvalidArgument("lost member " + std::to_string(member) + " is listed twice");
    is_lost[member] = true;
  }
  std::vector<int> sorted = lost;
  std::sort(sorted.begin(), sorted.end());
  const std::string head = "cannot rebuild: " + std::to_string(lost.size()) + " of " + std::to_string(n_) +
                           " members lost (" + JoinIds(sorted) + "), scheme " + scheme_.ToString() + " tolerates " +
                           std::to_string(m());
  if (scheme_.kind != Scheme::Kind::kReplicate) {
    if (static_cast<int>(lost.size()) > m()) return FailedPrecondition(head);
    return Status::Ok();
  }
  for (int s = 0; s < n_; ++s) {
    if (!is_lost[s]) continue;
    std::vector<int> copies;
    bool any_copy = false;
    for (int j = 0; j < m(); ++j) {
      copies.push_back(HolderIndex(s, j));
      any_copy = any_copy || !is_lost[copies.back()];
    }
    if (!any_copy) {
      return FailedPrecondition(head + ": member " + std::to_string(s) + "'s data and every copy of it (on " +
                                JoinIds(copies) + ") are gone");
    }
  }
  return Status::Ok();
}

Status EncodePartialParity(const StripeLayout& layout, const Codec& codec, int member, const uint8_t* data,
                           size_t padded_length, size_t offset, size_t len, uint8_t* out) {
  MEMENTO_RETURN_IF_ERROR(CheckCodec(layout, codec));
  const int n = layout.group_size();
  const int m = layout.m();
  if (member < 0 || member >= n) {
    return InvalidArgument("member " + std::to_string(member) + " is outside the group 0.." + std::to_string(n - 1));
  }
  const size_t seg = layout.SegmentLength(padded_length);
  if (layout.PaddedLength(padded_length) != padded_length || offset > seg || len > seg - offset) {
    return InvalidArgument("window [" + std::to_string(offset) + ", " + std::to_string(offset + len) +
                           ") does not fit a segment of " + std::to_string(seg) + " bytes (padded length " +
                           std::to_string(padded_length) + ")");
  }
  std::memset(out, 0, static_cast<size_t>(n) * m * len);
  std::vector<uint8_t*> slots(m);
  for (int s = 0; s < n; ++s) {
    const int t = layout.SegmentOf(member, s);
    if (t < 0) continue;
    for (int j = 0; j < m; ++j) {
      slots[j] = out + (static_cast<size_t>(layout.HolderIndex(s, j)) * m + j) * len;
    }
    codec.EncodeUpdate(t, data + static_cast<size_t>(t) * seg + offset, slots.data(), len);
  }
  return Status::Ok();
}

Status EncodeLocally(const StripeLayout& layout, const Codec& codec, const std::vector<std::vector<uint8_t>>& data,
                     std::vector<std::vector<uint8_t>>* parity) {
  MEMENTO_RETURN_IF_ERROR(CheckCodec(layout, codec));
  MEMENTO_RETURN_IF_ERROR(CheckBuffers(layout, data, *parity));
  const size_t seg = layout.SegmentLength(data[0].size());
  const int k = layout.k();
  std::vector<const uint8_t*> in(k);
  std::vector<uint8_t*> out(layout.m());
  for (int s = 0; s < layout.group_size(); ++s) {
    const std::vector<SegmentRef> refs = StripeSegments(layout, s, seg);
    for (int t = 0; t < k; ++t) in[t] = data[refs[t].member].data() + refs[t].offset;
    for (int j = 0; j < layout.m(); ++j) out[j] = (*parity)[refs[k + j].member].data() + refs[k + j].offset;
    codec.Encode(in.data(), out.data(), seg);
  }
  return Status::Ok();
}

Status RebuildLocally(const StripeLayout& layout, const Codec& codec, const std::vector<int>& lost,
                      std::vector<std::vector<uint8_t>>* data, std::vector<std::vector<uint8_t>>* parity) {
  MEMENTO_RETURN_IF_ERROR(CheckCodec(layout, codec));
  MEMENTO_RETURN_IF_ERROR(CheckBuffers(layout, *data, *parity));
  MEMENTO_RETURN_IF_ERROR(layout.CheckRecoverable(lost));
  std::vector<bool> is_lost(layout.group_size(), false);
  for (int member : lost) is_lost[member] = true;
  const size_t seg = layout.SegmentLength((*data)[0].size());
  for (int s = 0; s < layout.group_size(); ++s) {
    std::vector<int> erased;
    const std::vector<int> contributors = layout.ContributorsOf(s);
    for (int t = 0; t < layout.k(); ++t) {
      if (is_lost[contributors[t]]) erased.push_back(t);
    }
    for (int j = 0; j < layout.m(); ++j) {
      if (is_lost[layout.HolderIndex(s, j)]) erased.push_back(layout.k() + j);
    }
    if (erased.empty()) continue;
    const std::vector<SegmentRef> refs = StripeSegments(layout, s, seg);
    std::vector<uint8_t*> segments;
    for (size_t i = 0; i < refs.size(); ++i) {
      auto& buffers = static_cast<int>(i) < layout.k() ? *data : *parity;
      segments.push_back(buffers[refs[i].member].data() + refs[i].offset);
    }
    Status st = codec.Decode(segments.data(), erased, seg);
    if (!st.ok()) return st.WithContext("rebuilding stripe " + std::to_string(s));
  }
  return Status::Ok();
}

}  // namespace memento
