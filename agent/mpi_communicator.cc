// MPI communicator; MPI error codes converted to Status here and nowhere else.
#include "agent/mpi_communicator.h"

#include <mpi.h>

#include <chrono>
#include <string>
#include <thread>

namespace memento {
namespace {

Status FromMpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return Status::Ok();
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  return Unavailable(std::string(what) + ": " + std::string(msg, len));
}

// Polls a request with short sleeps, so an idle agent does not spin a core.
// Waits for requests by polling MPI_Testall, since a thread blocked in MPI_Wait would hold the
// library's lock against the agent's other threads. MPI moves a large message only while it is
// polled (a fragment per call on shared memory), so bulk transfers (encoding, rebuilds) poll
// back to back and only yield the core; small ones (the agreement rounds, every few ms) sleep
// between polls instead of spinning.
Status WaitAll(MPI_Request* reqs, int count, const char* what, bool bulk) {
  for (;;) {
    int done = 0;
    MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Testall(count, reqs, &done, MPI_STATUSES_IGNORE), what));
    if (done) return Status::Ok();
    if (bulk) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
}

Status Wait(MPI_Request* req, const char* what, bool bulk = false) { return WaitAll(req, 1, what, bulk); }

// Above this, a collective is a bulk transfer.
constexpr size_t kBulkBytes = size_t{64} << 10;

class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    if (owned_) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  Status Allgather(const void* in, size_t bytes, void* out) override {
    MPI_Request req;
    MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Iallgather(in, static_cast<int>(bytes), MPI_BYTE, out,
                                                   static_cast<int>(bytes), MPI_BYTE, comm_, &req),
                                    "MPI_Iallgather"));
    return Wait(&req, "MPI_Iallgather", bytes * static_cast<size_t>(size_) > kBulkBytes);
  }

  Result<std::unique_ptr<Communicator>> Duplicate() override {
    MPI_Comm dup;
    MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Comm_dup(comm_, &dup), "MPI_Comm_dup"));
    MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
    return std::unique_ptr<Communicator>(new MpiCommunicator(dup, true));
  }

  Result<std::unique_ptr<Communicator>> Split(int color, int key) override {
    MPI_Comm part;
    MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Comm_split(comm_, color, key, &part), "MPI_Comm_split"));
    MPI_Comm_set_errhandler(part, MPI_ERRORS_RETURN);
    return std::unique_ptr<Communicator>(new MpiCommunicator(part, true));
  }

  Status ReduceScatterXor(const void* in, void* out, size_t block_bytes) override {
    if (block_bytes % 8 != 0) return InvalidArgument("ReduceScatterXor needs blocks of a multiple of 8 bytes");
    MPI_Request req;
    MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Ireduce_scatter_block(in, out, static_cast<int>(block_bytes / 8),
                                                              MPI_UINT64_T, MPI_BXOR, comm_, &req),
                                    "MPI_Ireduce_scatter_block"));
    return Wait(&req, "MPI_Ireduce_scatter_block", /*bulk=*/true);
  }

  Status Exchange(const std::vector<Message>& sends, const std::vector<Message>& recvs) override {
    MEMENTO_ASSIGN_OR_RETURN(auto pending, StartExchange(sends, recvs));
    return pending->Wait();
  }

  class MpiPending : public Pending {
   public:
    ~MpiPending() override { Wait().IgnoreError(); }
    Status Wait() override {
      if (reqs.empty()) return Status::Ok();
      Status st = WaitAll(reqs.data(), static_cast<int>(reqs.size()), "point-to-point exchange", /*bulk=*/true);
      reqs.clear();
      return st;
    }
    std::vector<MPI_Request> reqs;
  };

  Result<std::unique_ptr<Pending>> StartExchange(const std::vector<Message>& sends,
                                                 const std::vector<Message>& recvs) override {
    auto pending = std::make_unique<MpiPending>();
    pending->reqs.reserve(sends.size() + recvs.size());
    for (const Message& r : recvs) {
      MPI_Request req;
      MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Irecv(r.data, static_cast<int>(r.bytes), MPI_BYTE, r.peer, r.tag, comm_, &req),
                                      "MPI_Irecv"));
      pending->reqs.push_back(req);
    }
    for (const Message& s : sends) {
      MPI_Request req;
      MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Isend(s.data, static_cast<int>(s.bytes), MPI_BYTE, s.peer, s.tag, comm_, &req),
                                      "MPI_Isend"));
      pending->reqs.push_back(req);
    }
    return std::unique_ptr<Pending>(std::move(pending));
  }

 private:
  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

Status InitMpi(int* argc, char*** argv) {
  int provided = 0;
  // Agreement rounds, erasure encoding and rebuilds run on different threads, each on its own
  // communicator.
  MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided), "MPI_Init_thread"));
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  if (provided < MPI_THREAD_MULTIPLE) {
    return FailedPrecondition("this MPI library does not provide MPI_THREAD_MULTIPLE, which the agent needs");
  }
  return Status::Ok();
}

void FinalizeMpi() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

std::unique_ptr<Communicator> MakeMpiCommunicator() {
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false);
}

}  // namespace memento
