// The agent's Unix-socket server: accepts the node's ranks (socket mode 0600, peer uid checked),
// one thread per connection, each request answered by NodeState. Thread-safe.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "agent/node_state.h"
#include "core/status.h"

namespace memento {

class SocketServer {
 public:
  SocketServer(std::string path, NodeState* state) : path_(std::move(path)), state_(state) {}
  ~SocketServer();

  // Binds and listens; the socket file is created mode 0600.
  Status Start();
  // Stops accepting, closes every connection and joins the threads; removes the socket file.
  void Stop();

 private:
  void AcceptLoop();
  void Serve(int fd);

  std::string path_;
  NodeState* state_;
  int listen_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;
  std::mutex mu_;
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::vector<Worker> workers_;       // GUARDED_BY(mu_); finished ones are joined on each accept
  std::vector<int> fds_;              // GUARDED_BY(mu_)
};

}  // namespace memento
