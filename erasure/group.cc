// Group membership: dealing nodes to groups, topology files.
#include "erasure/group.h"

#include <algorithm>
#include <charconv>
#include <set>
#include <tuple>

namespace memento {
namespace {

std::string JoinIds(const std::vector<int>& ids) {
  std::string s;
  for (int id : ids) s += (s.empty() ? "" : ", ") + std::to_string(id);
  return s;
}

std::string_view Trim(std::string_view s) {
  const size_t b = s.find_first_not_of(" \t\r");
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(" \t\r") - b + 1);
}

}  // namespace

Result<std::vector<std::vector<int>>> MakeGroups(const std::vector<NodeInfo>& nodes, int group_size) {
  const int n = static_cast<int>(nodes.size());
  if (group_size < 2) {
    return InvalidArgument("group size must be at least 2 (a node cannot protect itself), got " +
                           std::to_string(group_size));
  }
  if (n < group_size) {
    return InvalidArgument(std::to_string(n) + " node(s) cannot form a group of " + std::to_string(group_size) +
                           ": use a group size of at most " + std::to_string(n) + " or more nodes");
  }
  std::map<int, const NodeInfo*> by_id;
  std::map<std::string, std::vector<int>> ids_of_host;
  std::map<std::string, std::string> domain_of_host;
  for (const NodeInfo& node : nodes) {
    if (node.node_id < 0) return InvalidArgument("node id must be non-negative, got " + std::to_string(node.node_id));
    if (!by_id.emplace(node.node_id, &node).second) {
      return InvalidArgument("node " + std::to_string(node.node_id) + " is listed twice");
    }
    if (node.host.empty()) return InvalidArgument("node " + std::to_string(node.node_id) + " has no host name");
    auto [it, fresh] = domain_of_host.emplace(node.host, node.domain);
    if (!fresh && it->second != node.domain) {
      return InvalidArgument("host '" + node.host + "' is in two failure domains, '" + it->second + "' and '" +
                             node.domain + "' (node " + std::to_string(node.node_id) + ")");
    }
    ids_of_host[node.host].push_back(node.node_id);
  }
  const int groups = n / group_size;
  for (auto& [host, ids] : ids_of_host) {
    if (static_cast<int>(ids.size()) > groups) {
      std::sort(ids.begin(), ids.end());
      return InvalidArgument("host '" + host + "' runs " + std::to_string(ids.size()) + " nodes (" + JoinIds(ids) +
                             ") but " + std::to_string(n) + " nodes make only " + std::to_string(groups) +
                             " group(s) of " + std::to_string(group_size) +
                             ": two of them would share a group; use a smaller group size");
    }
  }

  // Domains, and hosts within a domain, are ordered by their smallest node id: ids then read in
  // their natural order where each host runs one node.
  std::map<std::string, int> first_of_domain, first_of_host;
  for (const NodeInfo& node : nodes) {
    auto [d, d_fresh] = first_of_domain.emplace(node.domain, node.node_id);
    if (!d_fresh) d->second = std::min(d->second, node.node_id);
    auto [h, h_fresh] = first_of_host.emplace(node.host, node.node_id);
    if (!h_fresh) h->second = std::min(h->second, node.node_id);
  }
  std::vector<const NodeInfo*> order;
  for (const NodeInfo& node : nodes) order.push_back(&node);
  auto key = [&](const NodeInfo* n) {
    return std::make_tuple(first_of_domain[n->domain], first_of_host[n->host], n->node_id);
  };
  std::sort(order.begin(), order.end(), [&](const NodeInfo* a, const NodeInfo* b) { return key(a) < key(b); });
  // A host's nodes are consecutive in `order` and at most `groups` many, so dealing puts them in
  // distinct groups; likewise a domain's run is spread as evenly as the group count allows.
  std::vector<std::vector<int>> result(groups);
  for (int t = 0; t < n; ++t) result[t % groups].push_back(order[t]->node_id);
  for (auto& group : result) {
    std::sort(group.begin(), group.end());
    std::set<std::string> hosts;
    for (int id : group) {
      if (!hosts.insert(by_id[id]->host).second) {
        return Internal("group dealing put two nodes of host '" + by_id[id]->host + "' in one group");
      }
    }
  }
  return result;
}

Result<std::map<int, std::string>> ParseTopology(std::string_view text, const std::string& name) {
  std::map<int, std::string> domains;
  std::map<int, int> line_of;
  int line_no = 0;
  while (!text.empty()) {
    ++line_no;
    const size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text = eol == std::string_view::npos ? std::string_view() : text.substr(eol + 1);
    line = Trim(line.substr(0, line.find('#')));
    if (line.empty()) continue;
    const std::string where = "topology " + name + ":" + std::to_string(line_no) + ": ";
    const size_t gap = line.find_first_of(" \t");
    const std::string_view id_text = line.substr(0, gap);
    const std::string_view domain = gap == std::string_view::npos ? std::string_view() : Trim(line.substr(gap));
    if (domain.empty() || domain.find_first_of(" \t") != std::string_view::npos) {
      return InvalidArgument(where + "expected '<node_id> <domain>', got '" + std::string(line) + "'");
    }
    int id = -1;
    auto [end, ec] = std::from_chars(id_text.data(), id_text.data() + id_text.size(), id);
    if (ec != std::errc() || end != id_text.data() + id_text.size() || id < 0) {
      return InvalidArgument(where + "node id '" + std::string(id_text) + "' is not a non-negative integer");
    }
    if (auto it = line_of.find(id); it != line_of.end()) {
      return InvalidArgument(where + "node " + std::to_string(id) + " is listed again (first on line " +
                             std::to_string(it->second) + ")");
    }
    line_of[id] = line_no;
    domains[id] = std::string(domain);
  }
  return domains;
}

Result<std::map<int, std::string>> ReadTopology(const std::string& path, FileSystem* fs) {
  Result<std::string> text = ReadFileToString(fs, path);
  if (!text.ok()) return text.status().WithContext("reading topology file");
  return ParseTopology(*text, path);
}

Status AssignDomains(const std::map<int, std::string>& topology, std::vector<NodeInfo>* nodes) {
  for (NodeInfo& node : *nodes) {
    auto it = topology.find(node.node_id);
    if (it == topology.end()) {
      return NotFound("node " + std::to_string(node.node_id) + " (host '" + node.host +
                      "') is not in the topology file");
    }
    node.domain = it->second;
  }
  return Status::Ok();
}

}  // namespace memento
