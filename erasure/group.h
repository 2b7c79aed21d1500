// Group membership: which nodes' memories protect each other (DESIGN.md §5). Agents are split
// into groups of about N nodes, never two on one host, spread over failure domains (racks,
// switches) when a topology file names them. How bytes are laid out inside a group is in
// erasure/stripe.h. Thread safety: pure functions.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "core/file_system.h"
#include "core/status.h"

namespace memento {

struct NodeInfo {
  // The agent's node id (MEMENTO_NODE_ID); unique among the nodes. Default -1 (unset: invalid).
  int node_id = -1;
  // The machine the node runs on; two members of a group never share one. Must not be empty.
  // Simulated nodes on one machine must be given distinct names here. Default "".
  std::string host;
  // Failure domain (rack, switch) from the topology file; "" = unknown, a domain of its own.
  // All nodes of one host must be in one domain. Default "".
  std::string domain;
};

// Splits `nodes` into groups of at least `group_size` members and returns the node ids of each
// group, ascending; member i of a group is its i-th id (StripeLayout's member index).
//   - There are floor(n / group_size) groups and the nodes are dealt over all of them, so sizes
//     differ by at most one and none is below group_size; the first groups take the remainder
//     (11 nodes in groups of 4 give 6 + 5, not 4 + 7: no group is much larger, and weaker, than
//     the rest).
//   - Nodes are ordered by domain, then host, then node id (domains and hosts by their smallest
//     node id) and dealt to the groups in turn, so a domain's nodes land in consecutive groups:
//     a domain of d nodes has at most ceil(d / groups) members in any group (4 racks x 4 nodes in
//     groups of 4: one node per rack in each group).
//   - The nodes of one host land in distinct groups.
// The result depends only on the set of nodes, not their order. InvalidArgument when group_size
// < 2, fewer nodes than group_size, a node id repeats, a host is empty or in two domains, or a
// host runs more nodes than there are groups (naming the host).
Result<std::vector<std::vector<int>>> MakeGroups(const std::vector<NodeInfo>& nodes, int group_size);

// Reads a topology file: one `<node_id> <domain>` per line (node id a non-negative integer,
// domain any word without spaces), '#' starts a comment, blank lines are skipped. Errors name the
// file and line: InvalidArgument for a malformed line or a node listed twice; the file system's
// error (NotFound, IOError) when the file cannot be read.
Result<std::map<int, std::string>> ReadTopology(const std::string& path, FileSystem* fs = PosixFileSystem());

// The parser behind ReadTopology; `name` is used in errors in place of the path.
Result<std::map<int, std::string>> ParseTopology(std::string_view text, const std::string& name);

// Sets each node's domain from `topology`. NotFound naming the node when it is not listed: with a
// topology given, a node of unknown place would defeat the spreading silently.
Status AssignDomains(const std::map<int, std::string>& topology, std::vector<NodeInfo>* nodes);

}  // namespace memento
