// Reads the MEMENTO_* environment once.
#include "core/env.h"

#include <algorithm>
#include <cstdlib>
#include <string_view>

namespace memento {
namespace {

std::string Get(const char* name, std::string def = "") {
  const char* v = std::getenv(name);
  return v ? std::string(v) : def;
}

int GetInt(const char* name, int def) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return def;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  return (end && *end == '\0') ? static_cast<int>(x) : def;
}

LogLevel ParseLevel(std::string_view s) {
  if (s == "debug") return LogLevel::kDebug;
  if (s == "warning" || s == "warn") return LogLevel::kWarning;
  if (s == "error") return LogLevel::kError;
  return LogLevel::kInfo;
}

EnvSettings Read() {
  EnvSettings e;
  e.agent_socket = Get("MEMENTO_AGENT_SOCKET");
  e.job_id = Get("MEMENTO_JOB_ID");
  e.job_token = Get("MEMENTO_JOB_TOKEN");
  e.node_id = GetInt("MEMENTO_NODE_ID", -1);
  e.ranks_per_node = GetInt("MEMENTO_RANKS_PER_NODE", 0);
  const std::string ids = Get("MEMENTO_NODE_IDS");
  for (size_t pos = 0; pos < ids.size();) {
    size_t comma = std::min(ids.find(',', pos), ids.size());
    e.node_ids.push_back(std::atoi(ids.substr(pos, comma - pos).c_str()));
    pos = comma + 1;
  }
  e.restore = Get("MEMENTO_RESTORE");
  e.heartbeat = Get("MEMENTO_HEARTBEAT");
  e.log_level = ParseLevel(Get("MEMENTO_LOG_LEVEL", "info"));
  e.copy_threads = GetInt("MEMENTO_COPY_THREADS", 0);
  e.fault_fs = Get("MEMENTO_FAULT_FS");
  e.attempt = GetInt("MEMENTO_ATTEMPT", -1);
  e.capture_log = Get("MEMENTO_CAPTURE_LOG");
  e.event_log = Get("MEMENTO_EVENT_LOG");
  return e;
}

}  // namespace

const EnvSettings& Env() {
  static const EnvSettings settings = Read();
  return settings;
}

std::string ExpandNodePattern(const std::string& pattern, int node_id) {
  std::string out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '%' && i + 1 < pattern.size() && pattern[i + 1] == 'n') {
      out += std::to_string(node_id);
      ++i;
    } else {
      out += pattern[i];
    }
  }
  return out;
}

}  // namespace memento
