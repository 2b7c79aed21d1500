// `memento diff A B`: compares the tensors of two checkpoints, per tensor name: shape and the
// largest absolute and relative difference. A and B may each be a memento universal checkpoint
// (names "<param>" for the value, "<param>.<state>" for the others), a DeepSpeed universal layout
// (a folder with zero/<param>/<state>.pt; same naming), a committed native checkpoint (its tensor
// names, which are its universal form's names under the default state naming; each tensor
// consolidated from every rank's shards at its logical shape), a safetensors file or folder of
// them, or a torch.save file (tensors of nested dicts, names joined with '.'). Free functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/file_system.h"
#include "core/status.h"

namespace memento {

struct DiffOptions {
  // Tensors differ where |a - b| > atol + rtol x |b| for some element (numpy.allclose). Defaults 0.
  double atol = 0;
  double rtol = 0;
};

struct TensorDiff {
  std::string name;
  // "equal", "differs", "shape" (shapes differ), "only in A", "only in B".
  std::string what;
  std::vector<int64_t> shape_a, shape_b;
  double max_abs = 0;  // over all elements (shapes equal)
  double max_rel = 0;  // |a - b| / |b| (0 where both are 0)
};

struct DiffReport {
  std::vector<TensorDiff> tensors;  // by name
  int64_t differing = 0;            // entries whose `what` is not "equal"
};

// Errors name the path: NotFound or InvalidArgument for one that is no checkpoint memento can
// compare, FailedPrecondition for a native checkpoint whose layout metadata is partial (convert it
// with a pattern spec and compare the universal form), DataLoss for bytes that fail their CRC.
Result<DiffReport> DiffCheckpoints(FileSystem* fs, const std::string& a, const std::string& b, const DiffOptions& options = {});

}  // namespace memento
