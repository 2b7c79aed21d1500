// ShardSpec <-> ShardSpecProto.
#include "proto/shard_convert.h"

namespace memento {

void ToProto(const ShardSpec& spec, proto::ShardSpecProto* out) {
  out->Clear();
  for (int64_t d : spec.global_shape) out->add_global_shape(d);
  for (int64_t d : spec.original_shape) out->add_original_shape(d);
  out->set_local_numel(spec.local_numel);
  for (const Fragment& f : spec.fragments) {
    proto::FragmentProto* fp = out->add_fragments();
    fp->set_kind(static_cast<int32_t>(f.kind));
    fp->set_local_offset(f.local_offset);
    for (int64_t o : f.box.offsets) fp->mutable_box()->add_offsets(o);
    for (int64_t l : f.box.lengths) fp->mutable_box()->add_lengths(l);
    fp->set_flat_begin(f.flat_begin);
    fp->set_flat_length(f.flat_length);
    fp->set_replica_id(f.replica_id);
  }
}

Result<ShardSpec> FromProto(const proto::ShardSpecProto& p) {
  ShardSpec spec;
  spec.global_shape.assign(p.global_shape().begin(), p.global_shape().end());
  spec.original_shape.assign(p.original_shape().begin(), p.original_shape().end());
  spec.local_numel = p.local_numel();
  for (int i = 0; i < p.fragments_size(); ++i) {
    const proto::FragmentProto& fp = p.fragments(i);
    if (fp.kind() != 0 && fp.kind() != 1) {
      return InvalidArgument("fragment " + std::to_string(i) + " has unknown kind " + std::to_string(fp.kind()));
    }
    Fragment f;
    f.kind = static_cast<Fragment::Kind>(fp.kind());
    f.local_offset = fp.local_offset();
    f.box.offsets.assign(fp.box().offsets().begin(), fp.box().offsets().end());
    f.box.lengths.assign(fp.box().lengths().begin(), fp.box().lengths().end());
    f.flat_begin = fp.flat_begin();
    f.flat_length = fp.flat_length();
    f.replica_id = fp.replica_id();
    spec.fragments.push_back(std::move(f));
  }
  return spec;
}

}  // namespace memento
