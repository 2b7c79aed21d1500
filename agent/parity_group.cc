// ParityGroup: windows of segments move through the communicator; erasure/ does the arithmetic.
#include "agent/parity_group.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <string>

#include "erasure/group.h"

namespace memento {

void NodeData::Add(uint8_t* data, size_t bytes) {
  regions_.push_back({data, bytes});
  size_ += bytes;
}

void NodeData::Read(size_t offset, size_t len, uint8_t* dst) const {
  size_t base = 0;
  for (const Region& r : regions_) {
    if (len == 0) break;
    if (offset < base + r.bytes) {
      const size_t in = offset - base;
      const size_t n = std::min(len, r.bytes - in);
      std::memcpy(dst, r.data + in, n);
      dst += n;
      offset += n;
      len -= n;
    }
    base += r.bytes;
  }
  if (len > 0) std::memset(dst, 0, len);  // padding
}

void NodeData::Write(size_t offset, size_t len, const uint8_t* src) {
  size_t base = 0;
  for (const Region& r : regions_) {
    if (len == 0) break;
    if (offset < base + r.bytes) {
      const size_t in = offset - base;
      const size_t n = std::min(len, r.bytes - in);
      std::memcpy(r.data + in, src, n);
      src += n;
      offset += n;
      len -= n;
    }
    base += r.bytes;
  }
}

uint8_t* NodeData::Span(size_t offset, size_t len) const {
  size_t base = 0;
  for (const Region& r : regions_) {
    if (offset < base + r.bytes) return offset + len <= base + r.bytes ? r.data + (offset - base) : nullptr;
    base += r.bytes;
  }
  return nullptr;
}

Result<std::unique_ptr<ParityGroup>> ParityGroup::Create(const Scheme& scheme, int group_size, Communicator* world,
                                                         const std::vector<std::string>& domains) {
  const int n = world->size();
  if (group_size <= 0 || group_size > n) group_size = n;
  std::vector<NodeInfo> nodes(n);
  for (int p = 0; p < n; ++p) {
    nodes[p].node_id = p;
    nodes[p].host = "position-" + std::to_string(p);  // one agent per node: positions are hosts
    if (!domains.empty()) nodes[p].domain = domains.at(p);
  }
  MEMENTO_ASSIGN_OR_RETURN(auto groups, MakeGroups(nodes, group_size));
  int group_id = -1, index = -1;
  std::vector<int> members;
  for (size_t g = 0; g < groups.size(); ++g) {
    for (size_t i = 0; i < groups[g].size(); ++i) {
      if (groups[g][i] == world->rank()) {
        group_id = static_cast<int>(g);
        index = static_cast<int>(i);
        members = groups[g];
      }
    }
  }
  if (group_id < 0) return Internal("position " + std::to_string(world->rank()) + " is in no parity group");
  MEMENTO_ASSIGN_OR_RETURN(StripeLayout layout, StripeLayout::Create(scheme, static_cast<int>(members.size())));
  MEMENTO_ASSIGN_OR_RETURN(auto codec, Codec::Create(scheme, layout.k()));
  // Both communicators order members by their index in the group.
  MEMENTO_ASSIGN_OR_RETURN(auto encode_comm, world->Split(group_id, index));
  MEMENTO_ASSIGN_OR_RETURN(auto rebuild_comm, encode_comm->Duplicate());
  return std::unique_ptr<ParityGroup>(new ParityGroup(std::move(layout), std::move(codec), std::move(members), index,
                                                      group_id, std::move(groups), std::move(encode_comm),
                                                      std::move(rebuild_comm)));
}

Status ParityGroup::Encode(const NodeData& data, size_t padded, uint8_t* parity) {
  const int n = layout_.group_size();
  const int m = layout_.m();
  const size_t seg = layout_.SegmentLength(padded);
  std::vector<uint8_t> window;
  std::vector<uint8_t> send;
  std::vector<uint8_t> recv;
  for (size_t off = 0; off < seg; off += window_) {
    const size_t len = std::min(window_, seg - off);
    const size_t block = static_cast<size_t>(m) * len;
    send.assign(static_cast<size_t>(n) * block, 0);
    recv.resize(block);
    window.resize(len);
    for (int s = 0; s < n; ++s) {
      const int t = layout_.SegmentOf(index_, s);
      if (t < 0) continue;
      data.Read(static_cast<size_t>(t) * seg + off, len, window.data());
      std::vector<uint8_t*> out(m);
      for (int j = 0; j < m; ++j) out[j] = send.data() + layout_.HolderIndex(s, j) * block + j * len;
      codec_->EncodeUpdate(t, window.data(), out.data(), len);
    }
    // Block sizes must be multiples of 8 for the XOR reduction: windows are (segments are 64-aligned).
    MEMENTO_RETURN_IF_ERROR(encode_comm_->ReduceScatterXor(send.data(), recv.data(), block));
    for (int j = 0; j < m; ++j) std::memcpy(parity + j * seg + off, recv.data() + j * len, len);
  }
  return Status::Ok();
}

struct ParityGroup::StripePlan {
  int stripe;
  std::vector<int> erased;  // codec indices, ascending (as plan.erased())
  DecodePlan plan;
};

int ParityGroup::MemberOf(int stripe, int c) const {
  const int k = layout_.k();
  return c < k ? layout_.ContributorsOf(stripe)[c] : layout_.HolderIndex(stripe, c - k);
}

// Per stripe touching a lost member: what is erased, and which k sources rebuild it.
Result<std::vector<ParityGroup::StripePlan>> ParityGroup::PlanRebuild(const std::vector<int>& lost) const {
  const int n = layout_.group_size();
  const int k = layout_.k();
  const int m = layout_.m();
  std::vector<StripePlan> plans;
  for (int s = 0; s < n; ++s) {
    std::vector<int> erased;
    for (int c = 0; c < k + m; ++c) {
      if (std::find(lost.begin(), lost.end(), MemberOf(s, c)) != lost.end()) erased.push_back(c);
    }
    if (erased.empty()) continue;
    MEMENTO_ASSIGN_OR_RETURN(DecodePlan plan, codec_->PlanDecode(erased));
    plans.push_back({s, erased, std::move(plan)});
  }
  return plans;
}

Status ParityGroup::Rebuild(const std::vector<int>& lost, NodeData* data, uint8_t* parity, size_t padded,
                            RebuildMethod method) {
  MEMENTO_RETURN_IF_ERROR(layout_.CheckRecoverable(lost));
  if (lost.empty()) return Status::Ok();
  // kAuto is the chain where there is one; a chain of one source (k = 1) is a gather.
  if (method != RebuildMethod::kGather && layout_.k() > 1) return RebuildChain(lost, data, parity, padded);
  return RebuildGather(lost, data, parity, padded);
}

Status ParityGroup::RebuildGather(const std::vector<int>& lost, NodeData* data, uint8_t* parity, size_t padded) {
  const int k = layout_.k();
  const size_t seg = layout_.SegmentLength(padded);
  auto is_lost = [&](int member) { return std::find(lost.begin(), lost.end(), member) != lost.end(); };
  MEMENTO_ASSIGN_OR_RETURN(std::vector<StripePlan> plans, PlanRebuild(lost));
  const bool me_lost = is_lost(index_);
  // Two windows in flight: while window w is decoded, window w + 1 moves. Survivors send straight
  // from their slots and parity where a window lies in one region; buffers are allocated once per
  // half (uninitialised) and reused.
  struct Half {
    std::vector<std::unique_ptr<uint8_t[]>> out, in;
    std::map<std::pair<int, int>, const uint8_t*> sources;  // (plan, source pos) -> bytes
    std::unique_ptr<Communicator::Pending> pending;
    size_t off = 0, len = 0;
  };
  Half halves[2];
  auto start = [&](Half* h, size_t off) -> Status {
    h->off = off;
    h->len = std::min(window_, seg - off);
    const size_t len = h->len;
    h->sources.clear();
    std::vector<Communicator::Message> sends, recvs;
    size_t n_out = 0, n_in = 0;
    for (size_t pi = 0; pi < plans.size(); ++pi) {
      const StripePlan& p = plans[pi];
      const auto& sources = p.plan.sources();
      for (size_t si = 0; si < sources.size(); ++si) {
        const int c = sources[si];
        const int owner = MemberOf(p.stripe, c);
        const int tag = static_cast<int>(pi * 64 + si);
        for (int x : lost) {
          if (owner == index_ && x != index_) {
            // A survivor sends its segment (data) or parity slot of this stripe to lost member x.
            const uint8_t* src = c < k ? data->Span(static_cast<size_t>(c) * seg + off, len)
                                       : parity + static_cast<size_t>(c - k) * seg + off;
            if (src == nullptr) {
              if (h->out.size() <= n_out) h->out.push_back(std::unique_ptr<uint8_t[]>(new uint8_t[window_]));
              data->Read(static_cast<size_t>(c) * seg + off, len, h->out[n_out].get());
              src = h->out[n_out++].get();
            }
            sends.push_back({x, tag, const_cast<uint8_t*>(src), len});
          } else if (x == index_ && owner != index_) {
            if (h->in.size() <= n_in) h->in.push_back(std::unique_ptr<uint8_t[]>(new uint8_t[window_]));
            recvs.push_back({owner, tag, h->in[n_in].get(), len});
            h->sources[{static_cast<int>(pi), static_cast<int>(si)}] = h->in[n_in++].get();
          }
        }
      }
    }
    MEMENTO_ASSIGN_OR_RETURN(h->pending, rebuild_comm_->StartExchange(sends, recvs));
    return Status::Ok();
  };
  std::vector<std::unique_ptr<uint8_t[]>> scratch;  // decode outputs that cannot go in place
  if (seg == 0) return Status::Ok();
  MEMENTO_RETURN_IF_ERROR(start(&halves[0], 0));
  for (size_t w = 0, off = 0; off < seg; ++w, off += window_) {
    Half& cur = halves[w % 2];
    if (off + window_ < seg) MEMENTO_RETURN_IF_ERROR(start(&halves[(w + 1) % 2], off + window_));
    MEMENTO_RETURN_IF_ERROR(cur.pending->Wait());
    if (!me_lost) continue;
    const size_t len = cur.len;
    for (size_t pi = 0; pi < plans.size(); ++pi) {
      const StripePlan& p = plans[pi];
      bool mine = false;
      for (int c : p.erased) mine |= MemberOf(p.stripe, c) == index_;
      if (!mine) continue;
      const auto& sources = p.plan.sources();
      std::vector<const uint8_t*> in(sources.size());
      for (size_t si = 0; si < sources.size(); ++si) in[si] = cur.sources.at({static_cast<int>(pi), static_cast<int>(si)});
      // Outputs go straight to their place when it is one region; else through scratch.
      std::vector<uint8_t*> out(p.erased.size());
      std::vector<bool> placed(p.erased.size(), false);
      for (size_t e = 0; e < p.erased.size(); ++e) {
        const int c = p.erased[e];
        uint8_t* dst = nullptr;
        if (MemberOf(p.stripe, c) == index_) {
          dst = c < k ? data->Span(static_cast<size_t>(c) * seg + cur.off, len)
                      : parity + static_cast<size_t>(c - k) * seg + cur.off;
        }
        if (dst == nullptr) {
          while (scratch.size() <= e) scratch.push_back(std::unique_ptr<uint8_t[]>(new uint8_t[window_]));
          dst = scratch[e].get();
        } else {
          placed[e] = true;
        }
        out[e] = dst;
      }
      p.plan.Apply(in.data(), out.data(), len);
      for (size_t e = 0; e < p.erased.size(); ++e) {
        const int c = p.erased[e];
        if (placed[e] || MemberOf(p.stripe, c) != index_) continue;
        data->Write(static_cast<size_t>(c) * seg + cur.off, len, out[e]);  // spans regions or padding
      }
    }
  }
  return Status::Ok();
}

Status ParityGroup::RebuildChain(const std::vector<int>& lost, NodeData* data, uint8_t* parity, size_t padded) {
  const int k = layout_.k();
  const size_t seg = layout_.SegmentLength(padded);
  if (seg == 0) return Status::Ok();
  MEMENTO_ASSIGN_OR_RETURN(std::vector<StripePlan> plans, PlanRebuild(lost));
  // A member keeps two running sums per stripe it is a source of, each of its erased segments'
  // window: the window shrinks so that they stay within kChainBudget however large the group
  // (the same on every member: it depends only on the plans).
  constexpr size_t kChainBudget = size_t{256} << 20;
  size_t most_erased = 1;
  for (const StripePlan& p : plans) most_erased = std::max(most_erased, p.erased.size());
  const size_t cap = kChainBudget / (2 * std::max<size_t>(plans.size(), 1) * most_erased) / 65536 * 65536;
  const size_t window = std::min(window_, std::max<size_t>(cap, 65536));
  const size_t windows = (seg + window - 1) / window;
  // Stripe pi's chain: position p is source (p + pi) mod k of its plan (rotated, so that the
  // members end chains in turn). Window w of the running sum leaves position p at step w + p and
  // reaches the lost members from position k - 1 at step w + k - 1.
  struct Link {
    size_t plan;
    int position;                     // this member's place in the chain
    int source;                       // its index in plan.sources()
    int next = -1;                    // the member at position + 1, or -1 for the last
    std::unique_ptr<uint8_t[]> sum[2];  // the running sum of window w in sum[w % 2], erased x window
  };
  struct Output {
    size_t plan;
    int erased;  // index in plan.erased()
    int from;    // the chain's last member
    uint8_t* scratch[2] = {nullptr, nullptr};
    std::unique_ptr<uint8_t[]> own[2];
  };
  std::vector<Link> links;
  std::vector<Output> outputs;
  for (size_t pi = 0; pi < plans.size(); ++pi) {
    const StripePlan& p = plans[pi];
    const auto& sources = p.plan.sources();
    auto member_at = [&](int position) { return MemberOf(p.stripe, sources[(position + pi) % k]); };
    for (int position = 0; position < k; ++position) {
      if (member_at(position) != index_) continue;
      Link l{pi, position, static_cast<int>((position + pi) % k)};
      if (position + 1 < k) l.next = member_at(position + 1);
      links.push_back(std::move(l));
    }
    for (size_t e = 0; e < p.erased.size(); ++e) {
      if (MemberOf(p.stripe, p.erased[e]) == index_) outputs.push_back({pi, static_cast<int>(e), member_at(k - 1)});
    }
  }
  auto windowof = [&](size_t w) { return std::make_pair(w * window, std::min(window, seg - w * window)); };
  // Where codec index c of this member lives, for window [off, off + len): in place when it is one
  // region, else null.
  auto place = [&](int c, size_t off, size_t len) -> uint8_t* {
    return c < k ? data->Span(static_cast<size_t>(c) * seg + off, len)
                 : parity + static_cast<size_t>(c - k) * seg + off;
  };
  std::unique_ptr<uint8_t[]> read_buf;  // this member's data window when it spans regions
  // Adds this member's share of window w into its link's running sum (zeroed first at position 0).
  auto add_share = [&](Link& l, size_t w) {
    const StripePlan& p = plans[l.plan];
    const size_t erased = p.erased.size();
    const auto [off, len] = windowof(w);
    if (!l.sum[w % 2]) l.sum[w % 2].reset(new uint8_t[erased * window]);
    uint8_t* sum = l.sum[w % 2].get();
    if (l.position == 0) {
      for (size_t e = 0; e < erased; ++e) std::memset(sum + e * window, 0, len);
    }
    const int c = p.plan.sources()[l.source];
    const uint8_t* src = place(c, off, len);
    if (src == nullptr) {
      if (!read_buf) read_buf.reset(new uint8_t[window]);
      data->Read(static_cast<size_t>(c) * seg + off, len, read_buf.get());
      src = read_buf.get();
    }
    std::vector<uint8_t*> out(erased);
    for (size_t e = 0; e < erased; ++e) out[e] = sum + e * window;
    p.plan.ApplyUpdate(l.source, src, out.data(), len);
  };
  auto tag = [](size_t pi, int e) { return static_cast<int>(pi * 64 + 1 + e); };  // e = -1: the running sum
  const size_t steps = windows + static_cast<size_t>(k) - 1;
  for (Link& l : links) {
    if (l.position == 0) add_share(l, 0);
  }
  for (size_t t = 0; t < steps; ++t) {
    // Shares of the windows this member sends now; position 0's were added before (during the
    // last step, or above).
    for (Link& l : links) {
      const size_t p = static_cast<size_t>(l.position);
      if (p > 0 && t >= p && t - p < windows) add_share(l, t - p);
    }
    std::vector<Communicator::Message> sends, recvs;
    for (Link& l : links) {
      const size_t p = static_cast<size_t>(l.position);
      const StripePlan& plan = plans[l.plan];
      if (t >= p && t - p < windows) {
        const size_t w = t - p;
        const size_t len = windowof(w).second;
        uint8_t* sum = l.sum[w % 2].get();
        if (l.next >= 0) {
          // Erased outputs travel as one message, each at its window-sized place in the buffer.
          const size_t bytes = (plan.erased.size() - 1) * window + len;
          sends.push_back({l.next, tag(l.plan, -1), sum, bytes});
        } else {
          for (size_t e = 0; e < plan.erased.size(); ++e) {
            sends.push_back({MemberOf(plan.stripe, plan.erased[e]), tag(l.plan, static_cast<int>(e)),
                             sum + e * window, len});
          }
        }
      }
      // The previous position's sum of the window this member adds to next step.
      if (p > 0 && t + 1 >= p && t + 1 - p < windows) {
        const size_t w = t + 1 - p;
        const size_t len = windowof(w).second;
        if (!l.sum[w % 2]) l.sum[w % 2].reset(new uint8_t[plan.erased.size() * window]);
        const size_t bytes = (plan.erased.size() - 1) * window + len;
        const int prev = MemberOf(plan.stripe, plan.plan.sources()[(p - 1 + l.plan) % k]);
        recvs.push_back({prev, tag(l.plan, -1), l.sum[w % 2].get(), bytes});
      }
    }
    for (Output& o : outputs) {
      if (t + 1 < static_cast<size_t>(k) || t + 1 - k >= windows) continue;
      const size_t w = t + 1 - k;
      const auto [off, len] = windowof(w);
      const StripePlan& plan = plans[o.plan];
      uint8_t* dst = place(plan.erased[o.erased], off, len);
      o.scratch[w % 2] = nullptr;
      if (dst == nullptr) {  // spans regions or padding: through a buffer, written after the wait
        if (!o.own[w % 2]) o.own[w % 2].reset(new uint8_t[window]);
        dst = o.scratch[w % 2] = o.own[w % 2].get();
      }
      recvs.push_back({o.from, tag(o.plan, o.erased), dst, len});
    }
    MEMENTO_ASSIGN_OR_RETURN(auto pending, rebuild_comm_->StartExchange(sends, recvs));
    // While the sums move: position 0's shares of the next window (their other buffer is free).
    for (Link& l : links) {
      if (l.position == 0 && t + 1 < windows) add_share(l, t + 1);
    }
    MEMENTO_RETURN_IF_ERROR(pending->Wait());
    for (Output& o : outputs) {
      if (t + 1 < static_cast<size_t>(k) || t + 1 - k >= windows) continue;
      const size_t w = t + 1 - k;
      if (o.scratch[w % 2] == nullptr) continue;
      const auto [off, len] = windowof(w);
      const int c = plans[o.plan].erased[o.erased];
      data->Write(static_cast<size_t>(c) * seg + off, len, o.scratch[w % 2]);  // parity is always in place
    }
  }
  return Status::Ok();
}

Status ParityGroup::EncodeToHolders(const NodeData& data, size_t padded, uint8_t* parity) {
  const int n = layout_.group_size();
  const int k = layout_.k();
  const size_t seg = layout_.SegmentLength(padded);
  // Each parity slot this member holds is one row of its stripe's code: plan it once.
  const auto held = layout_.ParityHeldBy(index_);
  std::vector<DecodePlan> rows;
  for (const auto& [stripe, j] : held) {
    MEMENTO_ASSIGN_OR_RETURN(DecodePlan plan, codec_->PlanDecode({k + j}));
    rows.push_back(std::move(plan));
  }
  // Two windows in flight: while window w's sources are combined, window w + 1 moves. Buffers of
  // each half are allocated once (uninitialised); sends go straight from the slots when the
  // segment's window lies in one of them.
  struct Half {
    std::vector<std::unique_ptr<uint8_t[]>> out, in;
    std::vector<std::vector<const uint8_t*>> sources;
    std::unique_ptr<Communicator::Pending> pending;
    size_t off = 0, len = 0;
  };
  Half halves[2];
  auto start = [&](Half* h, size_t off) -> Status {
    h->off = off;
    h->len = std::min(window_, seg - off);
    const size_t len = h->len;
    std::vector<Communicator::Message> sends, recvs;
    size_t n_out = 0, n_in = 0;
    // My segment of every stripe I contribute to, to each of its holders.
    for (int s = 0; s < n; ++s) {
      const int t = layout_.SegmentOf(index_, s);
      if (t < 0) continue;
      const uint8_t* src = data.Span(static_cast<size_t>(t) * seg + off, len);
      if (src == nullptr) {
        if (h->out.size() <= n_out) h->out.push_back(std::unique_ptr<uint8_t[]>(new uint8_t[window_]));
        data.Read(static_cast<size_t>(t) * seg + off, len, h->out[n_out].get());
        src = h->out[n_out++].get();
      }
      for (int j = 0; j < layout_.m(); ++j) {
        const int holder = layout_.HolderIndex(s, j);
        if (holder == index_) continue;
        sends.push_back({holder, s * 64 + t, const_cast<uint8_t*>(src), len});
      }
    }
    // The k segments of every stripe I hold a row of.
    h->sources.assign(held.size(), {});
    for (size_t i = 0; i < held.size(); ++i) {
      const int s = held[i].first;
      const auto& contributors = layout_.ContributorsOf(s);
      for (int src : rows[i].sources()) {  // the plan's sources are the k data indices
        if (src >= k) return Internal("encoding plan of stripe " + std::to_string(s) + " reads a parity row");
        if (h->in.size() <= n_in) h->in.push_back(std::unique_ptr<uint8_t[]>(new uint8_t[window_]));
        recvs.push_back({contributors[src], s * 64 + src, h->in[n_in].get(), len});
        h->sources[i].push_back(h->in[n_in++].get());
      }
    }
    MEMENTO_ASSIGN_OR_RETURN(h->pending, encode_comm_->StartExchange(sends, recvs));
    return Status::Ok();
  };
  if (seg == 0) return Status::Ok();
  MEMENTO_RETURN_IF_ERROR(start(&halves[0], 0));
  for (size_t w = 0, off = 0; off < seg; ++w, off += window_) {
    Half& cur = halves[w % 2];
    if (off + window_ < seg) MEMENTO_RETURN_IF_ERROR(start(&halves[(w + 1) % 2], off + window_));
    MEMENTO_RETURN_IF_ERROR(cur.pending->Wait());
    for (size_t i = 0; i < held.size(); ++i) {
      uint8_t* out = parity + static_cast<size_t>(held[i].second) * seg + cur.off;
      rows[i].Apply(cur.sources[i].data(), &out, cur.len);
    }
  }
  return Status::Ok();
}


Status ParityGroup::ShareBlobs(const std::string& mine, std::vector<std::string>* all) {
  const int n = encode_comm_->size();
  uint64_t size = mine.size();
  std::vector<uint64_t> sizes(n);
  MEMENTO_RETURN_IF_ERROR(encode_comm_->Allgather(&size, sizeof size, sizes.data()));
  all->assign(n, std::string());
  std::vector<Communicator::Message> sends, recvs;
  for (int i = 0; i < n; ++i) {
    if (i == index_) {
      (*all)[i] = mine;
      continue;
    }
    (*all)[i].resize(sizes[i]);
    if (sizes[i] > 0) recvs.push_back({i, 1, (*all)[i].data(), sizes[i]});
    if (!mine.empty()) sends.push_back({i, 1, const_cast<char*>(mine.data()), mine.size()});
  }
  return encode_comm_->Exchange(sends, recvs);
}

Status ParityGroup::SendToLost(const std::vector<int>& lost, const std::function<std::string(int)>& blob_of,
                               std::string* mine) {
  const int n = rebuild_comm_->size();
  auto is_lost = [&](int i) { return std::find(lost.begin(), lost.end(), i) != lost.end(); };
  if (lost.empty()) return Status::Ok();
  // Every survivor sends what it keeps for each lost member (sizes first, then bytes); a lost
  // member takes the first non-empty one (a survivor rebuilt earlier may keep nothing).
  std::vector<std::string> out;
  std::vector<uint64_t> out_sizes;
  std::vector<uint64_t> in_sizes(n, 0);
  std::vector<Communicator::Message> sends, recvs;
  if (!is_lost(index_)) {
    out.reserve(lost.size());
    out_sizes.reserve(lost.size());
    for (int x : lost) {
      out.push_back(blob_of(x));
      out_sizes.push_back(out.back().size());
      sends.push_back({x, 2, &out_sizes.back(), sizeof(uint64_t)});
    }
  } else {
    for (int i = 0; i < n; ++i) {
      if (!is_lost(i)) recvs.push_back({i, 2, &in_sizes[i], sizeof(uint64_t)});
    }
  }
  MEMENTO_RETURN_IF_ERROR(rebuild_comm_->Exchange(sends, recvs));
  sends.clear();
  recvs.clear();
  std::vector<std::string> in(n);
  if (!is_lost(index_)) {
    for (size_t i = 0; i < lost.size(); ++i) {
      if (!out[i].empty()) sends.push_back({lost[i], 3, out[i].data(), out[i].size()});
    }
  } else {
    for (int i = 0; i < n; ++i) {
      if (is_lost(i) || in_sizes[i] == 0) continue;
      in[i].resize(in_sizes[i]);
      recvs.push_back({i, 3, in[i].data(), in_sizes[i]});
    }
  }
  MEMENTO_RETURN_IF_ERROR(rebuild_comm_->Exchange(sends, recvs));
  mine->clear();
  for (const std::string& b : in) {
    if (!b.empty()) {
      *mine = b;
      break;
    }
  }
  return Status::Ok();
}

}  // namespace memento
