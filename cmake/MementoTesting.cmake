# memento_add_test(NAME <name> SOURCES <files...> LABELS <labels...> [LIBS <libs...>] [NP <n>] [TIMEOUT <s>])
# One helper for every test. NP > 0 runs the binary under `mpirun -np NP` through tests/mpi_run.sh,
# which sets what Open MPI needs as root on small machines and removes the test's shared memory
# and temporary directories even when the test fails.
function(memento_add_test)
  cmake_parse_arguments(T "" "NAME;NP;TIMEOUT" "SOURCES;LABELS;LIBS" ${ARGN})
  add_executable(${T_NAME} ${T_SOURCES})
  target_link_libraries(${T_NAME} PRIVATE ${T_LIBS} GTest::gtest GTest::gtest_main memento_warnings)
  target_compile_definitions(${T_NAME} PRIVATE
    MEMENTO_BIN_DIR="${CMAKE_BINARY_DIR}/bin" MEMENTO_SOURCE_DIR="${CMAKE_SOURCE_DIR}")
  set_target_properties(${T_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  if(T_NP)
    add_test(NAME ${T_NAME} COMMAND ${CMAKE_SOURCE_DIR}/tests/mpi_run.sh ${T_NP} $<TARGET_FILE:${T_NAME}>)
  else()
    add_test(NAME ${T_NAME} COMMAND ${CMAKE_SOURCE_DIR}/tests/mpi_run.sh 0 $<TARGET_FILE:${T_NAME}>)
  endif()
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  set_tests_properties(${T_NAME} PROPERTIES LABELS "${T_LABELS}" TIMEOUT ${T_TIMEOUT})
endfunction()
