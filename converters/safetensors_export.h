// safetensors (https://github.com/huggingface/safetensors) for the ecosystem: export of the model
// weights of a memento universal or native checkpoint (cast to bf16, fp16 or fp32; optionally
// split into files of at most N bytes with Hugging Face's model.safetensors.index.json), and
// import of safetensors files as a universal checkpoint. All I/O goes through a FileSystem; free
// functions, each call self-contained.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/file_system.h"
#include "core/status.h"
#include "ucp_format/universal.h"

namespace memento {

struct SafetensorsExportOptions {
  // Element type of floating-point tensors in the files: kBF16, kF16 or kF32; kInvalid (default)
  // keeps each tensor's own. Integer and bool tensors are never cast.
  DType dtype = DType::kInvalid;
  // Largest data bytes of one file. 0 (default): one file, model.safetensors. Otherwise files
  // model-00001-of-0000N.safetensors (a tensor larger than this gets a file of its own) and
  // model.safetensors.index.json.
  uint64_t shard_bytes = 0;
  // Which state of each parameter is exported. Default "fp32", the value.
  std::string state = "fp32";
};

struct SafetensorsExportSummary {
  std::string out_dir;
  std::vector<std::string> files;  // names inside out_dir, in order
  int64_t tensors = 0;
  uint64_t bytes = 0;              // tensor bytes written (after the cast)
};

// Writes `out_dir` (must not exist; built under a temporary name, then renamed) from `src`: a
// universal checkpoint (manifest.pb) or a committed native one (manifest; consolidated first into
// a temporary universal checkpoint next to out_dir). Tensors are named by parameter, in name order.
Result<SafetensorsExportSummary> ExportSafetensors(FileSystem* fs, const std::string& src, const std::string& out_dir,
                                                   const SafetensorsExportOptions& options = {});

// Imports `src` (a .safetensors file, or a directory: every *.safetensors file in it) as a new
// universal checkpoint at `out_dir`: each tensor a parameter whose value is the tensor (dtype kept).
// InvalidArgument for a tensor name present in two files.
Result<ConvertSummary> ImportSafetensors(FileSystem* fs, const std::string& src, const std::string& out_dir,
                                         const ConvertOptions& options = {});

// Converts `n` elements from `from` to `to` (F64, F32, BF16, F16; round to nearest even).
// InvalidArgument for other pairs.
Result<std::vector<uint8_t>> CastElements(DType from, DType to, const uint8_t* src, size_t n);

}  // namespace memento
