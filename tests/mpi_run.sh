#!/usr/bin/env bash
# mpi_run.sh NP BINARY [ARGS...]: runs a test binary (under `mpirun -np NP` when NP > 0) with what
# Open MPI needs as root on small machines, in its own temporary directory, and removes the test's
# shared memory, temporary files and stray agents afterwards, even when the test fails. That
# includes what Open MPI leaves of the jobs a test SIGKILLs (the agents of a "node loss"): their
# session directories (about 8 MB each) and shared-memory segments go to the test's own places.
set -u
np=$1; shift
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
prefix="t$$x"
export MEMENTO_TEST_PREFIX=$prefix
export MEMENTO_TEST_TMP=$(mktemp -d "/tmp/memento-test-$prefix.XXXX")
mpi_shm=/dev/shm/memento-mpi-$prefix
mkdir -p "$mpi_shm"
export OMPI_MCA_orte_tmpdir_base=$MEMENTO_TEST_TMP OMPI_MCA_btl_vader_backing_directory=$mpi_shm
cleanup() {
  pkill -9 -f -- "--job $prefix" 2>/dev/null
  rm -f /dev/shm/memento-"$prefix"* 2>/dev/null
  rm -rf "$MEMENTO_TEST_TMP" "$mpi_shm"
}
trap cleanup EXIT
if [ "$np" -gt 0 ]; then
  mpirun --oversubscribe -np "$np" "$@"
else
  "$@"
fi
