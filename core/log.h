// Minimal leveled logging to stderr: `MEMENTO_LOG(kInfo) << "agent " << id << " ready";`
// One line per statement, prefixed with time, level, process tag and pid. Thread-safe.
#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace memento {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// The process tag ("agent[0]", "client[3]") and the threshold; set once at start-up.
void SetLogTag(std::string tag);
void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();

// Appends `line` to the file at `path` (created 0600) with a single write(2), so that lines of
// concurrent processes never interleave: the event logs of tests and debugging (MEMENTO_CAPTURE_LOG,
// MEMENTO_EVENT_LOG, named by `what` in the warning logged when it fails).
void AppendLogLine(const std::string& path, const std::string& line, const char* what);

class LogLine {
 public:
  LogLine(LogLevel level, const char* file, int line);
  ~LogLine();
  template <typename T>
  LogLine& operator<<(const T& v) {
    stream_ << v;
    return *this;
  }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

}  // namespace memento

#define MEMENTO_LOG(level)                                                   \
  if (::memento::LogLevel::level < ::memento::GetLogLevel()) {               \
  } else                                                                     \
    ::memento::LogLine(::memento::LogLevel::level, __FILE__, __LINE__)
