// Logging implementation: a single write(2) per line so lines from threads never interleave.
#include "core/log.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

#include "core/env.h"

namespace memento {
namespace {

std::mutex g_tag_mu;
std::string g_tag = "memento";
std::atomic<int> g_level{-1};

const char* LevelName(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return "D";
    case LogLevel::kInfo: return "I";
    case LogLevel::kWarning: return "W";
    case LogLevel::kError: return "E";
  }
  return "?";
}

}  // namespace

void SetLogTag(std::string tag) {
  std::lock_guard<std::mutex> lock(g_tag_mu);
  g_tag = std::move(tag);
}

void SetLogLevel(LogLevel level) { g_level.store(static_cast<int>(level)); }

LogLevel GetLogLevel() {
  int l = g_level.load(std::memory_order_relaxed);
  if (l < 0) {
    l = static_cast<int>(Env().log_level);
    g_level.store(l);
  }
  return static_cast<LogLevel>(l);
}

LogLine::LogLine(LogLevel level, const char* file, int line) : level_(level) {
  (void)file;
  (void)line;
}

LogLine::~LogLine() {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  localtime_r(&t, &tm);
  char ts[32];
  std::snprintf(ts, sizeof ts, "%02d:%02d:%02d.%03d", tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms));
  std::string tag;
  {
    std::lock_guard<std::mutex> lock(g_tag_mu);
    tag = g_tag;
  }
  std::string out = std::string(ts) + " " + LevelName(level_) + " " + tag + " " + stream_.str() + "\n";
  ssize_t ignored = ::write(STDERR_FILENO, out.data(), out.size());
  (void)ignored;
}

void AppendLogLine(const std::string& path, const std::string& line, const char* what) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    MEMENTO_LOG(kWarning) << what << " " << path << ": " << std::strerror(errno);
    return;
  }
  if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size())) {
    MEMENTO_LOG(kWarning) << what << " " << path << ": short write";
  }
  ::close(fd);
}

}  // namespace memento
