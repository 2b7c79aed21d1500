// The subcommands of memento-bench. Each takes its own argv (argv[0] is the subcommand's name),
// prints its figures on stdout (with --json, the last line is one JSON object) and returns the
// process exit code (bench/harness.h: kExitOk, kExitFailed, kExitUsage, kExitSkipped).
#pragma once

namespace memento::bench {

// Capture bandwidth against the memcpy / pinned-D2H limit, and the training stall per snapshot.
int CaptureMain(int argc, char** argv);

// Flush bandwidth through the agent against dd oflag=direct to the same directory, the library's
// writer alone, and the training-step time with flushing on vs off.
int FlushMain(int argc, char** argv);

// Erasure-coding throughput of a parity group over MPI against ISA-L on one thread and MPI
// point-to-point bandwidth, both encodings (partial parities, send to holders), and the rebuild of
// a lost node against restoring its bytes from storage. Runs itself under mpirun when needed.
int ErasureMain(int argc, char** argv);

// From a node loss to training resumed under memento-run, broken into its parts, recovering from
// memory (parity rebuild) and from storage; against 10 s + state / copy bandwidth.
int RecoveryMain(int argc, char** argv);

// Conversion of a native checkpoint to the universal format (`memento convert`) against `cp -r`
// of the same checkpoint, and the conversion's peak RSS against 2 x the largest tensor + 256 MiB.
int ConvertMain(int argc, char** argv);

// A restart in another layout restored from the agents' memory over NCCL against the same restart
// restored from storage (cold and warm page cache), and a memcpy of the bytes. Needs GPUs.
int ReshardMain(int argc, char** argv);

}  // namespace memento::bench
