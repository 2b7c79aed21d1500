// The command lines memento-run starts: the agents' job (one agent per node) and the training job
// (R ranks per node), for mpirun (simulated nodes or a host list) and for srun (under Slurm).
// Pure functions of their inputs, so tests check them without a cluster.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "launcher/options.h"

namespace memento::launcher {

// The nodes of one attempt, by position: node ids (agents and ranks use them in names) and, on a
// cluster, hosts.
struct NodePlan {
  std::vector<int> ids;
  std::vector<std::string> hosts;  // empty for simulated nodes
};

struct Command {
  std::vector<std::string> argv;
  // Set in the launched process's environment and exported to every process of the job.
  std::vector<std::pair<std::string, std::string>> env;
  std::string ToString() const;  // argv joined with spaces, quoted where needed; env not shown
};

// Whether `o` and the environment select srun (--launcher srun, or auto with SLURM_JOB_ID set).
bool UsesSrun(const Options& o, bool slurm_job_present);

// Node-local paths: `dir`/node-%n/{agent.sock,catalog,agent.pid} ("%n" = node id).
std::string NodeDirPattern(const std::string& work_dir);

// The agents' job. `token` goes into the environment, never on the command line.
Command AgentCommand(const Options& o, const NodePlan& plan, bool srun, const std::string& agent_bin,
                     const std::string& work_dir, const std::string& token,
                     int attempt = -1);

// The training job: every rank gets MEMENTO_* in its environment.
Command TrainingCommand(const Options& o, const NodePlan& plan, bool srun, const std::string& work_dir,
                        const std::string& token, const std::string& heartbeat, const std::string& restore,
                        int attempt = 0);

// Reads a hostfile: one host per line, '#' comments, "host" or "host slots=N" (slots ignored: the
// launcher places --ranks-per-node ranks per host). InvalidArgument naming the line at fault.
Result<std::vector<std::string>> ReadHostfile(const std::string& path);

// Where Open MPI puts its session directories on this host: OMPI_MCA_orte_tmpdir_base, else
// TMPDIR, TEMP or TMP, else /tmp.
std::string MpiTmpdirBase();

// mpirun keeps a job's session directory (its PMIx segments, about 8 MB) in
// `base`/ompi.<host>.<uid>/pid.<its pid>/ and removes it when it exits; an mpirun killed with
// SIGKILL leaves it, one per such stop over a long job. Removes what the dead mpirun `pid` left
// under `base` for this user; returns how many directories it removed.
int RemoveMpiSessionDir(int64_t pid, const std::string& base);

}  // namespace memento::launcher
