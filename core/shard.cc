// The shard model: validation, printing, flat-range decomposition and the layout helpers.
#include "core/shard.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace memento {
namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

std::string Str(int64_t v) { return std::to_string(v); }

std::string Range(int64_t begin, int64_t end) { return "[" + Str(begin) + "," + Str(end) + ")"; }

// Row-major strides of `shape` (elements).
std::vector<int64_t> Strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (size_t d = shape.size(); d-- > 1;) strides[d - 1] = strides[d] * shape[d];
  return strides;
}

int64_t RowMajorIndex(const std::vector<int64_t>& strides, const std::vector<int64_t>& point) {
  int64_t index = 0;
  for (size_t d = 0; d < point.size(); ++d) index += point[d] * strides[d];
  return index;
}

// Intersection of two boxes of the same rank; false when it is empty.
bool Intersect(const Box& a, const Box& b, Box* out) {
  const size_t rank = a.offsets.size();
  out->offsets.resize(rank);
  out->lengths.resize(rank);
  for (size_t d = 0; d < rank; ++d) {
    const int64_t lo = std::max(a.offsets[d], b.offsets[d]);
    const int64_t hi = std::min(a.offsets[d] + a.lengths[d], b.offsets[d] + b.lengths[d]);
    if (hi <= lo) return false;
    out->offsets[d] = lo;
    out->lengths[d] = hi - lo;
  }
  return true;
}

// Appends the boxes of the flat range [begin, end) of the sub-tensor of dims `d`.. whose leading
// coordinates are `prefix` (see FlatRangeToBoxes).
void AppendFlatBoxes(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides, size_t d,
                     std::vector<int64_t>* prefix, int64_t begin, int64_t end, std::vector<Box>* out) {
  if (begin >= end) return;
  const size_t rank = shape.size();
  auto emit = [&](int64_t offset, int64_t length) {
    Box box;
    box.offsets = *prefix;
    box.lengths.assign(prefix->size(), 1);
    box.offsets.push_back(offset);
    box.lengths.push_back(length);
    for (size_t e = d + 1; e < rank; ++e) {
      box.offsets.push_back(0);
      box.lengths.push_back(shape[e]);
    }
    out->push_back(std::move(box));
  };
  const int64_t s = strides[d];
  int64_t first_row = begin / s;
  const int64_t first_rest = begin % s;
  const int64_t last_row = end / s;
  const int64_t last_rest = end % s;
  auto recurse = [&](int64_t row, int64_t b, int64_t e) {
    prefix->push_back(row);
    AppendFlatBoxes(shape, strides, d + 1, prefix, b, e, out);
    prefix->pop_back();
  };
  if (first_row == last_row) {  // inside one row of dim d (so s > 1)
    recurse(first_row, first_rest, last_rest);
    return;
  }
  if (first_rest != 0) {
    recurse(first_row, first_rest, s);
    ++first_row;
  }
  if (last_row > first_row) emit(first_row, last_row - first_row);
  if (last_rest != 0) recurse(last_row, 0, last_rest);
}

// The global region of a fragment as boxes, and the first and last global element it covers.
struct Region {
  std::vector<Box> boxes;
  int64_t first = 0;
  int64_t last = 0;
};

Region RegionOf(const Fragment& f, const std::vector<int64_t>& shape,
                const std::vector<int64_t>& strides) {
  Region r;
  if (f.kind == Fragment::Kind::kFlat) {
    r.boxes = FlatRangeToBoxes(shape, f.flat_begin, f.flat_length);
    r.first = f.flat_begin;
    r.last = f.flat_begin + f.flat_length - 1;
  } else {
    r.boxes.push_back(f.box);
    r.first = RowMajorIndex(strides, f.box.offsets);
    std::vector<int64_t> end = f.box.offsets;
    for (size_t d = 0; d < end.size(); ++d) end[d] += f.box.lengths[d] - 1;
    r.last = RowMajorIndex(strides, end);
  }
  return r;
}

// The first global element two regions share, or -1.
int64_t FirstSharedElement(const Region& a, const Region& b, const std::vector<int64_t>& strides) {
  int64_t first = -1;
  Box meet;
  for (const Box& x : a.boxes) {
    for (const Box& y : b.boxes) {
      if (!Intersect(x, y, &meet)) continue;
      const int64_t e = RowMajorIndex(strides, meet.offsets);
      if (first < 0 || e < first) first = e;
    }
  }
  return first;
}

Status CheckShape(const std::vector<int64_t>& shape, const char* what) {
  // The product of the non-zero dims bounds every row-major stride (Strides), also when a zero dim
  // makes the tensor empty: [0, 2^61, 8] holds no element, but its first stride does not fit.
  int64_t numel = 1;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] < 0) {
      return InvalidArgument(std::string(what) + " " + ShapeString(shape) + " has negative dim " +
                             std::to_string(d));
    }
    if (__builtin_mul_overflow(numel, std::max<int64_t>(shape[d], 1), &numel)) {
      return InvalidArgument(std::string(what) + " " + ShapeString(shape) +
                             " has more elements than int64 can count");
    }
  }
  return Status::Ok();
}

Status CheckFragment(const ShardSpec& spec, size_t i, int64_t numel) {
  const Fragment& f = spec.fragments[i];
  const std::string name = "fragment " + std::to_string(i) + ": ";
  if (f.local_offset < 0) return InvalidArgument(name + "local_offset " + Str(f.local_offset) + " is negative");
  if (f.replica_id < 0) {
    return InvalidArgument(name + "replica_id " + std::to_string(f.replica_id) + " is negative");
  }
  int64_t elements = 0;
  switch (f.kind) {
    case Fragment::Kind::kBox: {
      const size_t rank = spec.global_shape.size();
      if (f.box.offsets.size() != rank || f.box.lengths.size() != rank) {
        return InvalidArgument(name + "box has " + std::to_string(f.box.offsets.size()) + " offsets and " +
                               std::to_string(f.box.lengths.size()) + " lengths but global_shape " +
                               ShapeString(spec.global_shape) + " has rank " + std::to_string(rank));
      }
      for (size_t d = 0; d < rank; ++d) {
        const int64_t off = f.box.offsets[d];
        const int64_t len = f.box.lengths[d];
        if (off < 0 || len < 0 || off > spec.global_shape[d] - len) {
          return InvalidArgument(name + "box dim " + std::to_string(d) + " " + Range(off, off + len) +
                                 " lies outside [0," + Str(spec.global_shape[d]) + ") of global_shape " +
                                 ShapeString(spec.global_shape));
        }
      }
      elements = f.box.numel();
      break;
    }
    case Fragment::Kind::kFlat:
      if (f.flat_begin < 0 || f.flat_length < 0 || f.flat_begin > numel - f.flat_length) {
        return InvalidArgument(name + "flat range " + Range(f.flat_begin, f.flat_begin + f.flat_length) +
                               " lies outside [0," + Str(numel) + ") of global_shape " +
                               ShapeString(spec.global_shape));
      }
      elements = f.flat_length;
      break;
    default:
      return InvalidArgument(name + "kind " + std::to_string(static_cast<int32_t>(f.kind)) +
                             " is neither box (0) nor flat (1)");
  }
  if (f.local_offset > spec.local_numel - elements) {
    return InvalidArgument(name + "local run " + Range(f.local_offset, f.local_offset + elements) +
                           " exceeds local_numel " + Str(spec.local_numel));
  }
  return Status::Ok();
}

Status CheckPartIndex(int parts, int index, const char* parts_name, const char* index_name) {
  if (parts < 1) return InvalidArgument(std::string(parts_name) + " " + std::to_string(parts) + " must be at least 1");
  if (index < 0 || index >= parts) {
    return InvalidArgument(std::string(index_name) + " " + std::to_string(index) + " is outside [0," +
                           std::to_string(parts) + ")");
  }
  return Status::Ok();
}

// torch.tensor_split sizes: the first `n % parts` parts get one more element.
std::vector<int64_t> EvenSizes(int64_t n, int parts) {
  std::vector<int64_t> sizes(static_cast<size_t>(parts), n / parts);
  for (int64_t p = 0; p < n % parts; ++p) ++sizes[static_cast<size_t>(p)];
  return sizes;
}

Status CheckDim(const std::vector<int64_t>& shape, int dim) {
  if (dim < 0 || static_cast<size_t>(dim) >= shape.size()) {
    return InvalidArgument("dim " + std::to_string(dim) + " is outside the rank " +
                           std::to_string(shape.size()) + " of shape " + ShapeString(shape));
  }
  return Status::Ok();
}

}  // namespace

int64_t Box::numel() const {
  int64_t n = 1;
  for (int64_t len : lengths) n *= len;
  return n;
}

int64_t Fragment::numel() const { return kind == Kind::kFlat ? flat_length : box.numel(); }

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t d = 0; d < shape.size(); ++d) {
    if (d > 0) s += ",";
    s += Str(shape[d]);
  }
  return s + "]";
}

std::vector<Box> FlatRangeToBoxes(const std::vector<int64_t>& shape, int64_t begin, int64_t length) {
  std::vector<Box> boxes;
  if (length <= 0) return boxes;
  if (shape.empty()) {  // a scalar: its one element
    boxes.emplace_back();
    return boxes;
  }
  const std::vector<int64_t> strides = Strides(shape);
  std::vector<int64_t> prefix;
  prefix.reserve(shape.size());
  AppendFlatBoxes(shape, strides, 0, &prefix, begin, begin + length, &boxes);
  return boxes;
}

Status ShardSpec::Validate() const {
  MEMENTO_RETURN_IF_ERROR(CheckShape(global_shape, "global_shape"));
  const int64_t numel = NumElements(global_shape);
  if (local_numel < 0) return InvalidArgument("local_numel " + Str(local_numel) + " is negative");
  if (!original_shape.empty()) {
    MEMENTO_RETURN_IF_ERROR(CheckShape(original_shape, "original_shape"));
    if (original_shape.size() != global_shape.size()) {
      return InvalidArgument("original_shape " + ShapeString(original_shape) + " and global_shape " +
                             ShapeString(global_shape) + " differ in rank");
    }
    if (original_shape[0] > global_shape[0]) {
      return InvalidArgument("original_shape " + ShapeString(original_shape) + " has more rows than global_shape " +
                             ShapeString(global_shape));
    }
    for (size_t d = 1; d < global_shape.size(); ++d) {
      if (original_shape[d] != global_shape[d]) {
        return InvalidArgument("original_shape " + ShapeString(original_shape) + " and global_shape " +
                               ShapeString(global_shape) + " differ in dim " + std::to_string(d));
      }
    }
  }
  for (size_t i = 0; i < fragments.size(); ++i) MEMENTO_RETURN_IF_ERROR(CheckFragment(*this, i, numel));

  // Local runs: sorted by start, each must begin at or after the furthest end seen so far.
  std::vector<size_t> order;
  for (size_t i = 0; i < fragments.size(); ++i) {
    if (fragments[i].numel() > 0) order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::pair(fragments[a].local_offset, a) < std::pair(fragments[b].local_offset, b);
  });
  size_t furthest = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const Fragment& f = fragments[order[k]];
    if (k > 0) {
      const Fragment& g = fragments[furthest];
      const int64_t g_end = g.local_offset + g.numel();
      if (f.local_offset < g_end) {
        const size_t hi = std::max(order[k], furthest);
        const size_t lo = std::min(order[k], furthest);
        const Fragment& fh = fragments[hi];
        const Fragment& fl = fragments[lo];
        return InvalidArgument("fragment " + std::to_string(hi) + " local run " +
                               Range(fh.local_offset, fh.local_offset + fh.numel()) + " overlaps fragment " +
                               std::to_string(lo) + " local run " +
                               Range(fl.local_offset, fl.local_offset + fl.numel()));
      }
      if (f.local_offset + f.numel() <= g_end) continue;
    }
    furthest = order[k];
  }

  // Global regions: a sweep over fragments sorted by their first element; only fragments whose
  // [first, last] spans meet can share an element. Reports the overlapping pair (hi, lo), hi > lo,
  // that comes first in (hi, lo) order.
  const std::vector<int64_t> strides = Strides(global_shape);
  std::vector<Region> regions(fragments.size());
  for (size_t i : order) regions[i] = RegionOf(fragments[i], global_shape, strides);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::pair(regions[a].first, a) < std::pair(regions[b].first, b);
  });
  bool found = false;
  size_t bad_hi = 0, bad_lo = 0;
  int64_t bad_element = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const Region& a = regions[order[k]];
    for (size_t m = k + 1; m < order.size() && regions[order[m]].first <= a.last; ++m) {
      const int64_t e = FirstSharedElement(a, regions[order[m]], strides);
      if (e < 0) continue;
      const size_t hi = std::max(order[k], order[m]);
      const size_t lo = std::min(order[k], order[m]);
      if (!found || std::pair(hi, lo) < std::pair(bad_hi, bad_lo)) {
        found = true;
        bad_hi = hi;
        bad_lo = lo;
        bad_element = e;
      }
    }
  }
  if (found) {
    return InvalidArgument("fragment " + std::to_string(bad_hi) + " overlaps fragment " + std::to_string(bad_lo) +
                           " at global element " + Str(bad_element));
  }
  return Status::Ok();
}

std::string ShardSpec::DebugString() const {
  std::string s = ShapeString(global_shape);
  if (!original_shape.empty()) s += " orig" + ShapeString(original_shape);
  int64_t end = 0;
  for (const Fragment& f : fragments) {
    s += " ";
    if (f.kind == Fragment::Kind::kFlat) {
      s += "flat(" + Str(f.flat_begin) + ":" + Str(f.flat_begin + f.flat_length) + ")";
    } else {
      s += "box(";
      for (size_t d = 0; d < f.box.offsets.size() && d < f.box.lengths.size(); ++d) {
        if (d > 0) s += ",";
        s += Str(f.box.offsets[d]) + ":" + Str(f.box.offsets[d] + f.box.lengths[d]);
      }
      s += ")";
    }
    s += "@" + Str(f.local_offset);
    if (f.replica_id != 0) s += "/r" + std::to_string(f.replica_id);
    end = std::max(end, f.local_offset + f.numel());
  }
  if (local_numel != end) s += " local=" + Str(local_numel);
  return s;
}

ShardSpec WholeTensor(const std::vector<int64_t>& shape, int32_t replica_id) {
  ShardSpec spec;
  spec.global_shape = shape;
  Fragment f;
  f.box.offsets.assign(shape.size(), 0);
  f.box.lengths = shape;
  f.replica_id = replica_id;
  spec.fragments.push_back(std::move(f));
  spec.local_numel = NumElements(shape);
  return spec;
}

Result<ShardSpec> SplitAlongDim(const std::vector<int64_t>& shape, int dim,
                                const std::vector<int64_t>& part_sizes, int index, int32_t replica_id) {
  MEMENTO_RETURN_IF_ERROR(CheckShape(shape, "shape"));
  MEMENTO_RETURN_IF_ERROR(CheckDim(shape, dim));
  if (part_sizes.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
    return InvalidArgument("too many parts (" + std::to_string(part_sizes.size()) + ")");
  }
  MEMENTO_RETURN_IF_ERROR(CheckPartIndex(static_cast<int>(part_sizes.size()), index, "parts", "index"));
  int64_t sum = 0;
  int64_t offset = 0;
  for (size_t p = 0; p < part_sizes.size(); ++p) {
    if (part_sizes[p] < 0 || part_sizes[p] > kInt64Max - sum) {
      return InvalidArgument("part " + std::to_string(p) + " size " + Str(part_sizes[p]) + " is invalid");
    }
    if (p == static_cast<size_t>(index)) offset = sum;
    sum += part_sizes[p];
  }
  const size_t d = static_cast<size_t>(dim);
  if (sum != shape[d]) {
    return InvalidArgument("part sizes sum to " + Str(sum) + " but shape " + ShapeString(shape) + " dim " +
                           std::to_string(dim) + " is " + Str(shape[d]));
  }
  ShardSpec spec = WholeTensor(shape, replica_id);
  spec.fragments[0].box.offsets[d] = offset;
  spec.fragments[0].box.lengths[d] = part_sizes[static_cast<size_t>(index)];
  spec.local_numel = spec.fragments[0].box.numel();
  return spec;
}

Result<ShardSpec> SplitEvenly(const std::vector<int64_t>& shape, int dim, int parts, int index,
                              int32_t replica_id) {
  MEMENTO_RETURN_IF_ERROR(CheckShape(shape, "shape"));
  MEMENTO_RETURN_IF_ERROR(CheckDim(shape, dim));
  MEMENTO_RETURN_IF_ERROR(CheckPartIndex(parts, index, "parts", "index"));
  return SplitAlongDim(shape, dim, EvenSizes(shape[static_cast<size_t>(dim)], parts), index, replica_id);
}

Result<ShardSpec> FusedSubParamSplit(const std::vector<int64_t>& shape, int dim,
                                     const std::vector<int64_t>& sub_sizes, int parts, int index,
                                     int32_t replica_id) {
  MEMENTO_RETURN_IF_ERROR(CheckShape(shape, "shape"));
  MEMENTO_RETURN_IF_ERROR(CheckDim(shape, dim));
  MEMENTO_RETURN_IF_ERROR(CheckPartIndex(parts, index, "parts", "index"));
  const size_t d = static_cast<size_t>(dim);
  int64_t sum = 0;
  for (size_t s = 0; s < sub_sizes.size(); ++s) {
    if (sub_sizes[s] < 0 || sub_sizes[s] > kInt64Max - sum) {
      return InvalidArgument("sub-tensor " + std::to_string(s) + " size " + Str(sub_sizes[s]) + " is invalid");
    }
    sum += sub_sizes[s];
  }
  if (sum != shape[d]) {
    return InvalidArgument("sub-tensor sizes sum to " + Str(sum) + " but shape " + ShapeString(shape) +
                           " dim " + std::to_string(dim) + " is " + Str(shape[d]));
  }
  ShardSpec spec;
  spec.global_shape = shape;
  int64_t sub_offset = 0;
  for (int64_t sub_size : sub_sizes) {
    const std::vector<int64_t> sizes = EvenSizes(sub_size, parts);
    const int64_t start = std::accumulate(sizes.begin(), sizes.begin() + index, int64_t{0});
    Fragment f;
    f.local_offset = spec.local_numel;
    f.box.offsets.assign(shape.size(), 0);
    f.box.lengths = shape;
    f.box.offsets[d] = sub_offset + start;
    f.box.lengths[d] = sizes[static_cast<size_t>(index)];
    f.replica_id = replica_id;
    spec.local_numel += f.box.numel();
    spec.fragments.push_back(std::move(f));
    sub_offset += sub_size;
  }
  return spec;
}

namespace {

struct ZeroGroup {
  std::vector<int64_t> starts;  // per parameter, its first element in the flattened group
  int64_t total = 0;            // unpadded
  int64_t partition = 0;        // elements per rank
};

Result<ZeroGroup> PlanZeroGroup(const std::vector<std::vector<int64_t>>& shapes, int dp, int64_t alignment) {
  if (dp < 1) return InvalidArgument("dp " + std::to_string(dp) + " must be at least 1");
  if (alignment < 1) return InvalidArgument("alignment " + Str(alignment) + " must be at least 1");
  ZeroGroup g;
  for (size_t p = 0; p < shapes.size(); ++p) {
    Status st = CheckShape(shapes[p], "shape");
    if (!st.ok()) return st.WithContext("parameter " + std::to_string(p));
    const int64_t n = NumElements(shapes[p]);
    if (n > kInt64Max - g.total) return InvalidArgument("parameter group has more elements than int64 can count");
    g.starts.push_back(g.total);
    g.total += n;
  }
  int64_t unit = 0;
  if (__builtin_mul_overflow(alignment, int64_t{dp}, &unit)) {
    return InvalidArgument("alignment " + Str(alignment) + " times dp " + std::to_string(dp) + " overflows int64");
  }
  const int64_t units = g.total / unit + (g.total % unit != 0 ? 1 : 0);
  int64_t padded = 0;
  if (__builtin_mul_overflow(units, unit, &padded)) {
    return InvalidArgument("padded parameter group has more elements than int64 can count");
  }
  g.partition = padded / dp;
  return g;
}

}  // namespace

Result<std::vector<FlatPartitionEntry>> ZeroFlatPartition(const std::vector<std::vector<int64_t>>& shapes,
                                                          int dp, int dp_index, int64_t alignment) {
  MEMENTO_ASSIGN_OR_RETURN(const ZeroGroup g, PlanZeroGroup(shapes, dp, alignment));
  MEMENTO_RETURN_IF_ERROR(CheckPartIndex(dp, dp_index, "dp", "dp_index"));
  const int64_t rank_begin = g.partition * dp_index;
  const int64_t rank_end = rank_begin + g.partition;
  std::vector<FlatPartitionEntry> entries;
  entries.reserve(shapes.size());
  for (size_t p = 0; p < shapes.size(); ++p) {
    const int64_t begin = g.starts[p];
    const int64_t end = begin + NumElements(shapes[p]);
    const int64_t lo = std::max(begin, rank_begin);
    const int64_t hi = std::min(end, rank_end);
    FlatPartitionEntry e;
    e.spec.global_shape = shapes[p];
    if (lo < hi) {
      Fragment f;
      f.kind = Fragment::Kind::kFlat;
      f.flat_begin = lo - begin;
      f.flat_length = hi - lo;
      f.replica_id = 0;
      e.spec.fragments.push_back(std::move(f));
      e.spec.local_numel = hi - lo;
      e.partition_offset = lo - rank_begin;
    } else {
      e.partition_offset = std::clamp(begin - rank_begin, int64_t{0}, g.partition);
    }
    entries.push_back(std::move(e));
  }
  return entries;
}

int64_t ZeroPartitionSize(const std::vector<std::vector<int64_t>>& shapes, int dp, int64_t alignment) {
  Result<ZeroGroup> g = PlanZeroGroup(shapes, dp, alignment);
  return g.ok() ? g->partition : -1;
}

Result<ShardSpec> VocabPaddedSplit(int64_t vocab, int64_t hidden, int64_t multiple, int parts, int index,
                                   int32_t replica_id) {
  if (vocab < 0 || hidden < 0) {
    return InvalidArgument("vocab " + Str(vocab) + " and hidden " + Str(hidden) + " must not be negative");
  }
  if (multiple < 1) return InvalidArgument("multiple " + Str(multiple) + " must be at least 1");
  MEMENTO_RETURN_IF_ERROR(CheckPartIndex(parts, index, "parts", "index"));
  int64_t unit = 0;
  int64_t padded = 0;
  if (__builtin_mul_overflow(multiple, int64_t{parts}, &unit) ||
      __builtin_mul_overflow(vocab / unit + (vocab % unit != 0 ? 1 : 0), unit, &padded)) {
    return InvalidArgument("padded vocab " + Str(vocab) + " to a multiple of " + Str(multiple) + " * " +
                           std::to_string(parts) + " overflows int64");
  }
  MEMENTO_ASSIGN_OR_RETURN(ShardSpec spec, SplitEvenly({padded, hidden}, 0, parts, index, replica_id));
  spec.original_shape = {vocab, hidden};
  return spec;
}

}  // namespace memento
