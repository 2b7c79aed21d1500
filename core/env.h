// Every MEMENTO_* environment variable, read in this one place, with its default.
// Env() reads them once (thread-safe) and returns the same values for the life of the process.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/log.h"

namespace memento {

struct EnvSettings {
  // MEMENTO_AGENT_SOCKET: path of the node agent's Unix socket; "%n" is replaced by the node id.
  // Default "" (the client then requires ClientOptions::agent_socket).
  std::string agent_socket;
  // MEMENTO_JOB_ID: the job's id, shared by agents and ranks. Default "".
  std::string job_id;
  // MEMENTO_JOB_TOKEN: the job's secret, checked in the handshake. Default "".
  std::string job_token;
  // MEMENTO_NODE_ID: this process's node id; -1 = unset.
  int node_id = -1;
  // MEMENTO_RANKS_PER_NODE: simulated nodes on one machine: node id = rank / this; 0 = unset.
  int ranks_per_node = 0;
  // MEMENTO_NODE_IDS: comma-separated node ids by node position ("0,1,4,3" after node 2 was
  // replaced by spare 4); with MEMENTO_RANKS_PER_NODE, node id = ids[rank / ranks_per_node].
  // Set by memento-run. Default empty.
  std::vector<int> node_ids;
  // MEMENTO_RESTORE: what a training program restores on start: "latest", a step, or "none".
  // Set by memento-run ("latest" on restarts). Default "" (the program decides).
  std::string restore;
  // MEMENTO_HEARTBEAT: "host:port" of memento-run's heartbeat listener (UDP); the client sends
  // a beat on each call that shows training progress. Default "" (no heartbeats).
  std::string heartbeat;
  // MEMENTO_LOG_LEVEL: debug | info | warning | error. Default warning for clients and info for
  // the agent is the caller's choice; this is the env override (default info).
  LogLevel log_level = LogLevel::kInfo;
  // MEMENTO_COPY_THREADS: host-path copy threads per rank; 0 = choose (default 0).
  int copy_threads = 0;
  // MEMENTO_ATTEMPT: which attempt of the job this process belongs to (0 = the first launch,
  // +1 per restart), like torchrun's TORCHELASTIC_RESTART_COUNT. Set by memento-run. Default -1.
  int attempt = -1;
  // MEMENTO_CAPTURE_LOG: tests and debugging — each rank appends "attempt=A rank=R step=S copied"
  // to this file when its copy of step S has landed (before reporting it to the agent) and
  // "... acked" once the agent acknowledged it (memento-stress bounds the restored version with
  // them). Default "" (no log).
  std::string capture_log;
  // MEMENTO_EVENT_LOG: tests and debugging — each agent appends "attempt=A node=N step=S
  // protected" when it records step S erasure-coded (or rebuilt), and "... committed" when it sees
  // step S's checkpoint committed to storage; "protecting" and "committing" come before anything
  // records either (memento-stress bounds restores after node losses with them: below by the
  // first two, above by the last two). Default "" (no log).
  std::string event_log;
  // MEMENTO_FAULT_FS: tests only — a FaultInjectionFileSystem spec for the agent's storage I/O.
  std::string fault_fs;
};

const EnvSettings& Env();

// Replaces every "%n" in `pattern` with `node_id`.
std::string ExpandNodePattern(const std::string& pattern, int node_id);

}  // namespace memento
