// Heartbeats from training ranks to memento-run: one UDP datagram per call that shows progress.
//
// A rank's client sends a beat when it connects, registers, opens its epoch, restores, snapshots
// and waits before the optimizer step; while it blocks in a long call to its agent (the epoch's
// agreement, a rebuild, a restore) it beats every 500 ms, since its agent is working for it. A
// hung rank stops beating; memento-run declares it hung after --hang-timeout seconds.
//
// Wire format (text, one datagram): "MHB1 <job> <rank> <pid> <phase> <step> <detail>", where
// phase is one of the names below, step is -1 when not known and detail is free text (the restore
// source), possibly empty. Datagrams of another job are ignored by the receiver.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "core/status.h"

namespace memento {

enum class BeatPhase {
  kConnected,   // Client::Connect succeeded
  kRegistered,  // the agent accepted the registration; slots are mapped
  kReady,       // the epoch is open (every rank registered; rebuilds and storage loads done)
  kRestored,    // Restore() returned: step = the version, or -1 when nothing was found
  kStep,        // Snapshot(step) or WaitUntilSafeToUpdate() after Snapshot(step)
  kWaiting,     // blocked in a call to the agent, which is working for this rank
  kClosed,      // the client was destroyed cleanly
};
const char* BeatPhaseName(BeatPhase p);

struct Beat {
  std::string job;
  int32_t rank = -1;
  int64_t pid = 0;
  BeatPhase phase = BeatPhase::kConnected;
  int64_t step = -1;
  std::string detail;
};
std::string FormatBeat(const Beat& b);
// InvalidArgument naming what is wrong when `text` is not a beat.
Result<Beat> ParseBeat(const std::string& text);

// The rank's side: a connected UDP socket. Thread-safe. Sending never blocks and never fails the
// caller: a lost beat is only a late beat.
class HeartbeatSender {
 public:
  // `address` is "host:port" (IPv4 address or host name). InvalidArgument when malformed,
  // Unavailable when the host does not resolve.
  static Result<std::unique_ptr<HeartbeatSender>> Create(const std::string& address, std::string job, int32_t rank);
  ~HeartbeatSender();

  void Send(BeatPhase phase, int64_t step, const std::string& detail = "");

  // Beats kWaiting every 500 ms from a thread for as long as the object lives.
  class KeepAlive {
   public:
    KeepAlive(HeartbeatSender* sender, int64_t step);  // sender may be null: does nothing
    ~KeepAlive();
    KeepAlive(const KeepAlive&) = delete;
    KeepAlive& operator=(const KeepAlive&) = delete;

   private:
    HeartbeatSender* sender_;
    std::mutex mu_;
    std::condition_variable cv_;
    bool stop_ = false;  // GUARDED_BY(mu_)
    std::thread thread_;
  };

 private:
  HeartbeatSender(int fd, std::string job, int32_t rank) : fd_(fd), job_(std::move(job)), rank_(rank) {}
  int fd_;
  std::string job_;
  int32_t rank_;
};

// memento-run's side: a UDP socket bound to an ephemeral port on all interfaces.
class HeartbeatReceiver {
 public:
  static Result<std::unique_ptr<HeartbeatReceiver>> Create();
  ~HeartbeatReceiver();
  int port() const { return port_; }
  // Waits up to `timeout_ms` for one datagram; NotFound on timeout, InvalidArgument for a datagram
  // that is not a beat.
  Result<Beat> Receive(int timeout_ms);

 private:
  HeartbeatReceiver(int fd, int port) : fd_(fd), port_(port) {}
  int fd_;
  int port_;
};

}  // namespace memento
