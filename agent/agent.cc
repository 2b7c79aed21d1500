// RunAgent: wires catalog, node state, socket server and the agreement rounds together.
#include "agent/agent.h"

#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "agent/catalog.h"
#include "agent/flusher.h"
#include "agent/parity_group.h"
#include "erasure/group.h"
#include "erasure/scheme.h"
#include "core/file_system.h"
#include "agent/node_state.h"
#include "agent/server.h"
#include "core/env.h"
#include "core/log.h"

namespace memento {

Status RunAgent(AgentOptions options, Communicator* comm, const std::atomic<bool>* stop) {
  if (options.job_id.empty()) return InvalidArgument("the agent needs a job id (--job or MEMENTO_JOB_ID)");
  for (char c : options.job_id) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return InvalidArgument("job id '" + options.job_id + "' may hold only letters, digits, '-', '_' and '.'");
    }
  }
  // The job id is a path component (<storage>/<job>/step-N): "." and ".." would leave the root.
  if (options.job_id == "." || options.job_id == "..") {
    return InvalidArgument("job id '" + options.job_id + "' is not a name: it would put checkpoints outside the storage root");
  }
  // With storage, one slot may be held by a flush and one by the checksum of the newest capture
  // while the newest restorable version keeps a third: a fourth lets the next capture start at once.
  // Erasure coding keeps one more: the newest protected version, while a newer one is encoded.
  // Without storage, three: the newest restorable version, the newest capture while its checksum
  // and agreement run, and the next capture (with two, a snapshot every iteration waits for the
  // previous one's checksum: docs/PERFORMANCE.md, the PyTorch side-by-side).
  if (options.slots_per_rank == 0) {
    options.slots_per_rank = (options.storage_root.empty() ? 3 : 4) + (options.ec.empty() || options.ec == "none" ? 0 : 1);
  }
  if (options.inject_fs.empty()) options.inject_fs = Env().fault_fs;
  if (options.crc_threads <= 0) {
    // Checksums are the agent's main CPU work: a 2.6 GB capture every 65 ms needs about a dozen
    // cores of CRC-64 (docs/PERFORMANCE.md); they run at nice +10 below the training's threads.
    options.crc_threads = std::max<int>(4, static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN)) * 3 / 4);
  }
  if (options.slots_per_rank < 2) {
    return InvalidArgument("--slots must be at least 2 (one for the newest restorable version, one to capture into)");
  }
  if (!options.node_ids.empty() && static_cast<int>(options.node_ids.size()) != comm->size()) {
    return InvalidArgument("--node-ids lists " + std::to_string(options.node_ids.size()) + " ids for " +
                           std::to_string(comm->size()) + " agents");
  }
  const int node_id = !options.node_ids.empty() ? options.node_ids[comm->rank()]
                      : options.node_id >= 0    ? options.node_id
                                                : comm->rank();
  if (options.socket_path.empty()) options.socket_path = "/tmp/memento-" + options.job_id + "-node%n.sock";
  if (options.catalog_dir.empty()) options.catalog_dir = "/tmp/memento-" + options.job_id + "-node%n.catalog";
  const std::string socket_path = ExpandNodePattern(options.socket_path, node_id);
  const std::string catalog_dir = ExpandNodePattern(options.catalog_dir, node_id);
  SetLogTag("agent[" + std::to_string(node_id) + "]");

  MEMENTO_RETURN_IF_ERROR(MakePrivateDir(catalog_dir, "catalog directory"));
  MEMENTO_ASSIGN_OR_RETURN(auto catalog, Catalog::Open(catalog_dir));
  FileSystem* fs = PosixFileSystem();
  std::unique_ptr<FaultInjectionFileSystem> faulty;
  if (!options.inject_fs.empty()) {
    MEMENTO_ASSIGN_OR_RETURN(faulty, FaultInjectionFileSystem::FromSpec(fs, options.inject_fs));
    fs = faulty.get();
    MEMENTO_LOG(kWarning) << "storage I/O goes through a fault-injecting file system: " << options.inject_fs;
  }
  std::unique_ptr<Flusher> flusher;
  if (!options.restore_from.empty() && options.storage_root.empty()) {
    return InvalidArgument("--restore-from " + options.restore_from +
                           " needs --storage (where the resumed job's checkpoints go)");
  }
  if (!options.storage_root.empty()) {
    flusher = std::make_unique<Flusher>(options, fs, node_id);
    MEMENTO_RETURN_IF_ERROR(flusher->OpenRestoreSource());
    if (options.slots_per_rank < 4) {
      MEMENTO_LOG(kWarning) << "flushing with " << options.slots_per_rank
                            << " slots per rank: a capture may wait for a flush to release its slot";
    }
  }
  // Erasure coding: every agent forms the groups (collective), spread over the topology's domains.
  std::unique_ptr<ParityGroup> group;
  MEMENTO_ASSIGN_OR_RETURN(Scheme scheme, Scheme::Parse(options.ec));
  if (options.ec_encode != "partial" && options.ec_encode != "holders") {
    return InvalidArgument("--ec-encode must be 'partial' or 'holders', got '" + options.ec_encode + "'");
  }
  if (scheme.kind != Scheme::Kind::kNone) {
    std::vector<int32_t> ids(comm->size());
    int32_t mine = node_id;
    MEMENTO_RETURN_IF_ERROR(comm->Allgather(&mine, sizeof mine, ids.data()));
    std::vector<std::string> domains;
    if (!options.topology.empty()) {
      MEMENTO_ASSIGN_OR_RETURN(auto topo, ReadTopology(options.topology));
      for (int32_t id : ids) {
        auto it = topo.find(id);
        if (it == topo.end()) {
          return InvalidArgument("topology " + options.topology + " has no line for node " + std::to_string(id));
        }
        domains.push_back(it->second);
      }
    }
    MEMENTO_ASSIGN_OR_RETURN(group, ParityGroup::Create(scheme, options.group_size, comm, domains));
    MEMENTO_LOG(kInfo) << "erasure coding " << scheme.ToString() << ": group " << group->group_id() << " of "
                       << group->all_groups().size() << ", " << group->members().size() << " nodes, index "
                       << group->index();
  }
  NodeState state(options, node_id, catalog.get(), flusher.get(), comm->rank() == 0, group.get());
  if (flusher) flusher->SetYield([&state] { return state.captures_in_flight() > 0; });
  MEMENTO_RETURN_IF_ERROR(state.Recover());
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(socket_path).parent_path(), ec);
  SocketServer server(socket_path, &state);
  MEMENTO_RETURN_IF_ERROR(server.Start());
  const std::string pid_file = options.pid_file.empty() ? "" : ExpandNodePattern(options.pid_file, node_id);
  if (!pid_file.empty()) {
    std::ofstream out(pid_file, std::ios::trunc);
    out << ::getpid() << "\n";
    if (!out.flush()) return IOError("writing the pid file " + pid_file);
  }
  {
    // A launcher's default binding (mpirun binds one or two processes per node to a core) puts
    // every checksum, flush and encoding thread on that core: say so.
    cpu_set_t set;
    CPU_ZERO(&set);
    const long online = ::sysconf(_SC_NPROCESSORS_ONLN);
    if (::sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) < std::min<long>(online, 4)) {
      MEMENTO_LOG(kWarning) << "the agent may run on " << CPU_COUNT(&set) << " of " << online
                            << " CPUs (its launcher bound it): checksums, flushes and erasure coding will be "
                               "slow; start it with `mpirun --bind-to none` (memento-run does)";
    }
  }
  MEMENTO_LOG(kInfo) << "serving job '" << options.job_id << "' on " << socket_path << " (node " << node_id << " of "
                     << comm->size() << ", " << options.slots_per_rank << " slots per rank)";

  std::vector<TickPayload> all(comm->size());
  Status result;
  for (;;) {
    TickPayload mine = state.MakeTick(stop->load());
    Status st = comm->Allgather(&mine, sizeof mine, all.data());
    if (!st.ok()) {
      result = st.WithContext("agreement round with the other agents");
      break;
    }
    if (state.ApplyTick(all)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(options.tick_ms));
  }
  MEMENTO_LOG(kInfo) << "stopping";
  server.Stop();
  flusher.reset();  // joins a flush in progress
  if (!pid_file.empty()) ::unlink(pid_file.c_str());
  return result;
}

}  // namespace memento
