// Timeline formatting.
#include "launcher/timeline.h"

#include <cstdio>

#include "converters/json_writer.h"

namespace memento::launcher {
namespace {

std::string Seconds(double s) {
  if (s < 0) return "?";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f s", s);
  return buf;
}

std::string Ids(const std::vector<int>& v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out;
}

}  // namespace

std::string FormatTimeline(const Timeline& t) {
  std::string out = "memento-run: job " + t.job + ": " + t.outcome + " (" + std::to_string(t.restarts) +
                    (t.restarts == 1 ? " restart" : " restarts") + ", " + Seconds(t.total_s) + ")\n";
  for (size_t i = 0; i < t.failures.size(); ++i) {
    const Failure& f = t.failures[i];
    out += "  failure " + std::to_string(i + 1) + ": " + f.kind + " (" + f.detail + ") at " + Seconds(f.happened_s) +
           ", step " + std::to_string(f.last_step) + "\n";
    out += "    detected after " + Seconds(f.detection_latency_s()) + "; both jobs stopped in " + Seconds(f.stop_s);
    if (!f.lost_nodes.empty()) {
      out += "; lost node(s) " + Ids(f.lost_nodes) +
             (f.replacements.empty() ? std::string() : ", replaced by spare(s) " + Ids(f.replacements));
    }
    out += "\n";
    if (f.agent_restart_s >= 0) {
      out += "    recovery: agents restarted in " + Seconds(f.agent_restart_s) + ", registration " +
             Seconds(f.registration_s) + ", rebuild " + Seconds(f.rebuild_s) + ", restore " + Seconds(f.restore_s) + "\n";
    }
    if (f.restored_step >= 0) {
      out += "    restored step " + std::to_string(f.restored_step) + " from " + f.source + "; " +
             std::to_string(f.steps_lost) + (f.steps_lost == 1 ? " step" : " steps") + " lost; training resumed " +
             Seconds(f.resumed_after_s) + " after the failure\n";
    } else if (f.restored_step == -1) {
      out += "    nothing to restore: training started over\n";
    }
  }
  return out;
}

std::string TimelineJson(const Timeline& t) {
  JsonWriter w;
  w.BeginObject().Key("job").String(t.job).Key("outcome").String(t.outcome).Key("exit_code").Int(t.exit_code);
  w.Key("restarts").Int(t.restarts).Key("total_s").Double(t.total_s).Key("failures").BeginArray();
  for (const Failure& f : t.failures) {
    w.BeginObject().Key("attempt").Int(f.attempt).Key("kind").String(f.kind).Key("detail").String(f.detail);
    w.Key("injected").Bool(f.injected).Key("happened_s").Double(f.happened_s).Key("detected_s").Double(f.detected_s);
    w.Key("detection_latency_s").Double(f.detection_latency_s()).Key("last_step").Int(f.last_step);
    w.Key("stop_s").Double(f.stop_s).Key("lost_nodes").BeginArray();
    for (int n : f.lost_nodes) w.Int(n);
    w.EndArray().Key("replacements").BeginArray();
    for (int n : f.replacements) w.Int(n);
    w.EndArray();
    w.Key("agent_restart_s").Double(f.agent_restart_s).Key("registration_s").Double(f.registration_s);
    w.Key("rebuild_s").Double(f.rebuild_s).Key("restore_s").Double(f.restore_s);
    w.Key("resumed_after_s").Double(f.resumed_after_s).Key("restored_step").Int(f.restored_step);
    w.Key("source").String(f.source).Key("steps_lost").Int(f.steps_lost).EndObject();
  }
  w.EndArray().EndObject();
  return w.str() + "\n";
}

}  // namespace memento::launcher
