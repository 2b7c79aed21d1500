// Conversions between the shard model (core/shard.h) and its Protobuf form.
#pragma once

#include "core/shard.h"
#include "proto/memento.pb.h"

namespace memento {

void ToProto(const ShardSpec& spec, proto::ShardSpecProto* out);
// Checks enum values; shape and bound checks are ShardSpec::Validate's.
Result<ShardSpec> FromProto(const proto::ShardSpecProto& p);

}  // namespace memento
