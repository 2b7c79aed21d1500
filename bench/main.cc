// memento-bench: the benchmarks of DESIGN.md §9, one subcommand each; every figure is printed
// with the limit it approaches, measured in the same run.
//   memento-bench <subcommand> [flags]      memento-bench <subcommand> --help
#include <cstdio>
#include <cstring>

#include "bench/harness.h"
#include "bench/subcommands.h"

namespace {

struct Subcommand {
  const char* name;
  const char* summary;
  int (*main)(int argc, char** argv);
};

constexpr Subcommand kSubcommands[] = {
    {"capture", "capture bandwidth vs memcpy (or pinned D2H with --cuda) and the training stall",
     memento::bench::CaptureMain},
    {"flush", "flush bandwidth vs dd oflag=direct to the same directory, and the step time with flushing on/off",
     memento::bench::FlushMain},
    {"erasure", "erasure-coding throughput vs ISA-L (1 thread) and MPI p2p; rebuild of a lost node vs storage",
     memento::bench::ErasureMain},
    {"recovery", "node loss to training resumed under memento-run (memory vs storage), vs 10 s + state / copy bw",
     memento::bench::RecoveryMain},
    {"convert", "memento convert (native -> universal) throughput vs cp -r + sync; peak RSS vs 2 x largest tensor + 256 MiB",
     memento::bench::ConvertMain},
    {"reshard", "restart in another layout: from the agents' memory over NCCL vs from storage (cold, warm); needs GPUs",
     memento::bench::ReshardMain},
};

void Usage(FILE* out) {
  std::fprintf(out, "usage: memento-bench <subcommand> [flags]\n\nsubcommands:\n");
  for (const Subcommand& s : kSubcommands) std::fprintf(out, "  %-10s %s\n", s.name, s.summary);
  std::fprintf(out, "\n'memento-bench <subcommand> --help' lists its flags.\n"
                    "Exit status: 0 ran, 1 failed, 2 bad command line, 3 skipped (not supported here).\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    Usage(stderr);
    return memento::bench::kExitUsage;
  }
  const char* name = argv[1];
  if (std::strcmp(name, "help") == 0 || std::strcmp(name, "-h") == 0 || std::strcmp(name, "--help") == 0) {
    Usage(stdout);
    return memento::bench::kExitOk;
  }
  for (const Subcommand& s : kSubcommands) {
    if (std::strcmp(name, s.name) == 0) return s.main(argc - 1, argv + 1);
  }
  std::fprintf(stderr, "memento-bench: unknown subcommand '%s'\n\n", name);
  Usage(stderr);
  return memento::bench::kExitUsage;
}
