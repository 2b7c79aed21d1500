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

class MpiCommunicator : public Communicator {
 public:
  MpiCommunicator() {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  Status Allgather(const void* in, size_t bytes, void* out) override {
    MPI_Request req;
    MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Iallgather(in, static_cast<int>(bytes), MPI_BYTE, out,
                                                   static_cast<int>(bytes), MPI_BYTE, MPI_COMM_WORLD, &req),
                                    "MPI_Iallgather"));
    for (;;) {
      int done = 0;
      MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Test(&req, &done, MPI_STATUS_IGNORE), "MPI_Test"));
      if (done) return Status::Ok();
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

 private:
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

Status InitMpi(int* argc, char*** argv) {
  int provided = 0;
  MEMENTO_RETURN_IF_ERROR(FromMpi(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread"));
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  return Status::Ok();
}

void FinalizeMpi() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

std::unique_ptr<Communicator> MakeMpiCommunicator() { return std::make_unique<MpiCommunicator>(); }

}  // namespace memento
