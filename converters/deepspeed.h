// DeepSpeed checkpoints (docs/formats/ecosystem.md): import of a ZeRO stage 1/2/3 checkpoint of any
// TP x PP x DP layout (mp_rank_XX_model_states.pt, [bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt)
// into a memento universal checkpoint, and export of a universal checkpoint to DeepSpeed's
// universal layout (zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, zero/optimizer_state.pt,
// latest_universal). Files are read with the pickle machine (converters/torch_pickle.h): nothing in
// them runs. All I/O goes through a FileSystem. Free functions; each call is self-contained.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/file_system.h"
#include "core/status.h"
#include "ucp_format/universal.h"

namespace memento {

struct DeepSpeedImportOptions {
  // The checkpoint tag (a folder of the DeepSpeed directory). Empty (default): the `latest` file's,
  // or the directory itself when it holds the checkpoint files.
  std::string tag;
  // Tensor-parallel degree. 0 (default): from layer_01-model_* files, else the model states'
  // args.tensor_model_parallel_size, else the number of mp ranks (no pipeline parallelism).
  int tp = 0;
  // Options of the universal writer (threads, slab size, progress).
  ConvertOptions convert;
};

struct DeepSpeedImportSummary {
  std::string tag_dir;
  int tp = 0, pp = 0, dp = 0;
  int zero_stage = 0;
  int64_t params = 0;
  int64_t iteration = -1;
  // universal_checkpoint_info patterns that matched no parameter ("<list>: <pattern>").
  std::vector<std::string> unmatched_patterns;
  ConvertSummary universal;
  // Seconds spent reading the DeepSpeed files and staging the consolidated tensors (the universal
  // writer's own are universal.seconds).
  double gather_seconds = 0;
};

// Consolidates the DeepSpeed checkpoint in `ds_dir` into a new universal checkpoint at `out_dir`
// (which must not exist): per parameter its fp32 master weight, exp_avg, exp_avg_sq (full logical
// shape: TP slices merged by the universal_checkpoint_info patterns, vocab padding cut) and step.
// The per-parameter merge rules, the model-states files and the optimizer's global state are
// kept as blobs of rank 0 ("deepspeed/...") for ExportDeepSpeedUniversal. Errors name the file
// and parameter: NotFound for missing files, InvalidArgument for files that are not DeepSpeed's
// (or hostile pickles), FailedPrecondition when fragments do not cover a parameter or the TP slices'
// shapes do not fit its merge rule (sub-parameter widths: sub_param_shard_widths, else an even
// split). Nothing is left at `out_dir` on error. Memory: two merged parameter states and one TP
// slice (each state is gathered straight into its merged buffer while the one before is written).
Result<DeepSpeedImportSummary> ImportDeepSpeed(FileSystem* fs, const std::string& ds_dir, const std::string& out_dir,
                                               const DeepSpeedImportOptions& options = {});

struct DeepSpeedExportSummary {
  std::string out_dir;
  int64_t params = 0;
  int64_t files = 0;
  uint64_t tensor_bytes = 0;
};

// Writes the universal checkpoint `ucp_dir` in DeepSpeed's universal layout at `out_dir` (which must
// not exist; built under a temporary name and renamed), then `<parent of out_dir>/latest_universal`
// (the folder name). Per parameter zero/<param>/fp32.pt, exp_avg.pt, exp_avg_sq.pt hold
// {'param': tensor, 'cat_dim' | 'param_n_sub_params' | 'sub_param_shape', 'vocab_tensor'} (merge
// rules from an imported DeepSpeed checkpoint; 'cat_dim': 0 otherwise) and step.pt the step (a
// 0-dim tensor); mp_rank_XX_model_states.pt are copied when the source kept them. 'sub_param_shape'
// is DeepSpeed's deepspeed.checkpoint.universal_checkpoint.SubparamShape object, as
// ds_to_universal.py writes it: those files need torch.load(weights_only=False) (as DeepSpeed's
// loader calls it); every other file is loadable by torch.load(weights_only=True).
Result<DeepSpeedExportSummary> ExportDeepSpeedUniversal(FileSystem* fs, const std::string& ucp_dir,
                                                        const std::string& out_dir);

// Imports a torch.save file holding tensors in (nested) dicts and lists, such as a model's
// state_dict, as a new universal checkpoint at `out_dir`: each tensor a parameter named by its keys
// joined with '.', dtype kept. Views are copied out of their storages. Read with the pickle machine
// in its default mode (unknown globals are placeholders, not values; they are skipped).
Result<ConvertSummary> ImportTorchFile(FileSystem* fs, const std::string& path, const std::string& out_dir,
                                       const ConvertOptions& options = {});

}  // namespace memento
