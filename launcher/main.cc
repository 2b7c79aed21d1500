// memento-run: the launcher (see launcher/supervisor.h and `memento-run --help`).
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <string>

#include "launcher/options.h"
#include "launcher/supervisor.h"

int main(int argc, char** argv) {
  using namespace memento::launcher;
  memento::Result<Options> parsed = ParseOptions(argc, argv);
  if (!parsed.ok()) {
    std::fprintf(stderr, "memento-run: %s\n", parsed.status().message().c_str());
    return 2;
  }
  if (parsed->help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  std::string agent = parsed->agent_bin;
  if (agent.empty()) {
    char self[PATH_MAX] = {};
    ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    std::string dir = n > 0 ? std::string(self, static_cast<size_t>(n)) : std::string(argv[0]);
    dir = dir.substr(0, dir.rfind('/') + 1);
    agent = dir + "memento-agent";
  }
  if (::access(agent.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "memento-run: memento-agent not found at %s (use --agent-bin)\n", agent.c_str());
    return 2;
  }
  Supervisor supervisor(std::move(parsed).value(), agent);
  return supervisor.Run();
}
