# libFuzzer builds (clang only): MEMENTO_FUZZ=ON instruments every target for coverage
# (-fsanitize=fuzzer-no-link), so the fuzz targets under tests/fuzz see the branches of the parsers
# they drive, and builds those targets. Like the sanitizers (MementoSanitizers.cmake), coverage
# must reach the libraries, so these are global flags. Without MEMENTO_SANITIZE, it turns on
# address,undefined through that module. docs/RELIABILITY.md ("Fuzzing") lists the targets.
option(MEMENTO_FUZZ "Build the libFuzzer targets (tests/fuzz) and instrument every target for them (clang)" OFF)
set(MEMENTO_FUZZ_SECONDS 30 CACHE STRING "Seconds each fuzz target runs as a ctest test (-max_total_time)")

if(MEMENTO_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "MEMENTO_FUZZ=ON needs clang (libFuzzer), but the C++ compiler is "
                        "${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER}: configure a new build directory with "
                        "-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++")
  endif()
  if(NOT MEMENTO_SANITIZE)
    # The fuzz targets find memory errors and undefined behaviour only with these on.
    set(MEMENTO_SANITIZE address,undefined)
    include(MementoSanitizers)
  endif()
  string(REPLACE "," ";" _memento_fuzz_sanitizers "${MEMENTO_SANITIZE}")
  if("thread" IN_LIST _memento_fuzz_sanitizers)
    message(FATAL_ERROR "MEMENTO_FUZZ=ON with MEMENTO_SANITIZE=${MEMENTO_SANITIZE}: libFuzzer targets run under "
                        "address,undefined (or address alone), not thread")
  endif()
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:-fsanitize=fuzzer-no-link>")
  message(STATUS "memento: libFuzzer targets on, ${MEMENTO_FUZZ_SECONDS} s each under ctest")
endif()

# memento_add_fuzzer(NAME <name> LABEL <component> SOURCES <files...> LIBS <libs...>)
# The executable fuzz_<name> (in <build>/tests, next to the other tests) and the ctest test of the
# same name, labels `fuzz` and <component>. The test runs for MEMENTO_FUZZ_SECONDS from the
# committed seed corpus tests/fuzz/corpus/<name>, which it only reads: new inputs go to a scratch
# folder in the build tree (kept between runs), crash files to <build>/tests/fuzz/artifacts.
function(memento_add_fuzzer)
  cmake_parse_arguments(F "" "NAME;LABEL" "SOURCES;LIBS" ${ARGN})
  set(target fuzz_${F_NAME})
  add_executable(${target} ${F_SOURCES})
  target_link_libraries(${target} PRIVATE ${F_LIBS} memento_warnings)
  # The static sanitizer runtime: with the shared one (MementoSanitizers.cmake links every target so),
  # libFuzzer's C++ runtime comes first in the list of libraries, which ASan refuses at start.
  target_link_options(${target} PRIVATE -fsanitize=fuzzer -static-libsan)
  set_target_properties(${target} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  set(corpus ${PROJECT_SOURCE_DIR}/tests/fuzz/corpus/${F_NAME})
  if(NOT IS_DIRECTORY ${corpus})
    message(FATAL_ERROR "fuzz target ${F_NAME} has no seed corpus ${corpus}")
  endif()
  set(work ${CMAKE_BINARY_DIR}/tests/fuzz/work/${F_NAME})
  set(artifacts ${CMAKE_BINARY_DIR}/tests/fuzz/artifacts)
  file(MAKE_DIRECTORY ${work} ${artifacts})
  add_test(NAME ${target}
           COMMAND ${target} -max_total_time=${MEMENTO_FUZZ_SECONDS} -rss_limit_mb=2048 -timeout=10
                   -print_final_stats=1 -artifact_prefix=${artifacts}/${F_NAME}- ${work} ${corpus})
  math(EXPR timeout "${MEMENTO_FUZZ_SECONDS} + 120")
  set_tests_properties(${target} PROPERTIES LABELS "fuzz;${F_LABEL}" TIMEOUT ${timeout})
endfunction()
