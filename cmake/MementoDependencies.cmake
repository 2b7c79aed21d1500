# Finds memento's dependencies: the real Debian packages, plus CUDA from /usr/local/cuda when present.
find_package(Threads REQUIRED)
find_package(MPI REQUIRED COMPONENTS C)
find_package(Protobuf REQUIRED)
find_package(RocksDB CONFIG REQUIRED)

find_path(ISAL_INCLUDE_DIR isa-l/crc64.h REQUIRED)
find_library(ISAL_LIBRARY isal REQUIRED)
add_library(memento_isal INTERFACE)
target_include_directories(memento_isal SYSTEM INTERFACE ${ISAL_INCLUDE_DIR})
target_link_libraries(memento_isal INTERFACE ${ISAL_LIBRARY})

# CUDA: detect the toolkit first, then default the option to what was found (Ginkgo-style).
# Without it the CUDA capture path is a stub that answers NotSupported, so every build links.
if(NOT DEFINED CUDAToolkit_ROOT AND EXISTS /usr/local/cuda)
  set(CUDAToolkit_ROOT /usr/local/cuda)
endif()
find_package(CUDAToolkit QUIET)
option(MEMENTO_WITH_CUDA "Build the CUDA capture path" ${CUDAToolkit_FOUND})
if(MEMENTO_WITH_CUDA AND NOT CUDAToolkit_FOUND)
  message(FATAL_ERROR "MEMENTO_WITH_CUDA=ON but no CUDA toolkit was found (set CUDAToolkit_ROOT)")
endif()
message(STATUS "memento: CUDA capture path ${MEMENTO_WITH_CUDA}")

if(MEMENTO_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
if(MEMENTO_BUILD_BENCH)
  find_package(benchmark QUIET)
endif()
