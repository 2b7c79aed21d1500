// Kill points: parsed once from MEMENTO_KILL_POINT.
#include "core/kill_point.h"

#include <fcntl.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <string>

namespace memento {
namespace {

struct Spec {
  bool active = false;
  std::string name;
  int rank = -1;
  int64_t step = -1;
  std::string once;  // marker file: fire only in the process that creates it
  bool stop = false;  // SIGSTOP instead of SIGKILL
};

Spec Parse() {
  Spec s;
  const char* v = std::getenv("MEMENTO_KILL_POINT");
  if (v == nullptr || *v == '\0') return s;
  std::string all(v);
  size_t pos = all.find(':');
  s.name = all.substr(0, pos);
  while (pos != std::string::npos) {
    size_t next = all.find(':', pos + 1);
    std::string kv = all.substr(pos + 1, next == std::string::npos ? std::string::npos : next - pos - 1);
    if (kv.rfind("rank=", 0) == 0) s.rank = std::atoi(kv.c_str() + 5);
    if (kv.rfind("step=", 0) == 0) s.step = std::atoll(kv.c_str() + 5);
    if (kv.rfind("once=", 0) == 0) s.once = kv.substr(5);
    if (kv == "stop=1") s.stop = true;
    pos = next;
  }
  s.active = true;
  return s;
}

}  // namespace

void KillPoint(const char* name, int rank, int64_t step) {
  static const Spec spec = Parse();
  if (!spec.active || spec.name != name) return;
  if (spec.rank >= 0 && spec.rank != rank) return;
  if (spec.step >= 0 && spec.step != step) return;
  if (!spec.once.empty()) {
    // A restarted process inherits the same environment; the marker keeps the kill to one.
    const int fd = ::open(spec.once.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return;
    ::close(fd);
  }
  std::raise(spec.stop ? SIGSTOP : SIGKILL);
}

}  // namespace memento
