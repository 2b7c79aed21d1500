// Communicator over MPI_COMM_WORLD of the agents' MPI job. Collectives are non-blocking calls
// polled with short sleeps, so an idle agent does not spin a core.
#pragma once

#include <memory>

#include "core/communicator.h"

namespace memento {

// Initializes MPI (funneled threading) once per process; Finalize at exit.
Status InitMpi(int* argc, char*** argv);
void FinalizeMpi();

std::unique_ptr<Communicator> MakeMpiCommunicator();

}  // namespace memento
