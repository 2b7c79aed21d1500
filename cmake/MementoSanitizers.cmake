# Sanitizer builds: MEMENTO_SANITIZE instruments every target of the build (libraries, binaries and
# tests alike), so it is the one place where global flags are right. scripts/test-sanitizers
# configures and runs these builds; docs/RELIABILITY.md ("Sanitizers") says what runs where.
set(MEMENTO_SANITIZE "" CACHE STRING
    "Sanitizers for every target, as -fsanitize= takes them: address,undefined | thread | empty (off)")

if(MEMENTO_SANITIZE)
  string(REPLACE "," ";" _memento_sanitizers "${MEMENTO_SANITIZE}")
  if("thread" IN_LIST _memento_sanitizers AND
     ("address" IN_LIST _memento_sanitizers OR "leak" IN_LIST _memento_sanitizers))
    message(FATAL_ERROR "MEMENTO_SANITIZE=${MEMENTO_SANITIZE}: thread cannot be combined with address or leak")
  endif()

  set(_memento_sanitize_flags -fsanitize=${MEMENTO_SANITIZE} -fno-omit-frame-pointer)
  if("undefined" IN_LIST _memento_sanitizers)
    # Undefined behaviour fails the test (the process aborts) instead of printing and going on.
    list(APPEND _memento_sanitize_flags -fno-sanitize-recover=undefined)
  endif()
  set(_memento_sanitize_link_flags ${_memento_sanitize_flags})
  if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    # clang links its sanitizer runtime statically into executables only, but libmemento.so is
    # linked with --no-undefined and loaded by Python through ctypes: it takes the shared runtime
    # (as GCC's builds do), found through an rpath to clang's runtime folder. Under ASan/UBSan the
    # executables take it too, so every process of a test has the one runtime that Python preloads;
    # TSan's shared runtime crashes at start in an executable (libstdc++ initialises before it).
    execute_process(COMMAND ${CMAKE_CXX_COMPILER} --print-runtime-dir
                    OUTPUT_VARIABLE _memento_sanitizer_runtime_dir OUTPUT_STRIP_TRAILING_WHITESPACE)
    set(_memento_shared_runtime -shared-libsan)
    if(IS_DIRECTORY "${_memento_sanitizer_runtime_dir}")
      list(APPEND _memento_shared_runtime "-Wl,-rpath,${_memento_sanitizer_runtime_dir}")
    endif()
    if("thread" IN_LIST _memento_sanitizers)
      add_link_options("$<$<STREQUAL:$<TARGET_PROPERTY:TYPE>,SHARED_LIBRARY>:${_memento_shared_runtime}>")
    else()
      list(APPEND _memento_sanitize_link_flags ${_memento_shared_runtime})
    endif()
  endif()

  # C and C++ only: a CUDA compiler takes none of these flags.
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:${_memento_sanitize_flags}>")
  add_link_options(${_memento_sanitize_link_flags})
  message(STATUS "memento: sanitizers ${MEMENTO_SANITIZE} (${CMAKE_CXX_COMPILER_ID})")
endif()
