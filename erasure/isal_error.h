// ISA-L erasure-code errors converted to Status, once, at the edge (STYLE.md 3). Private to
// erasure/. Only gf_invert_matrix and xor_gen report failure; the encode kernels cannot fail.
#pragma once

#include <string>

#include "core/status.h"

// Evaluates an ISA-L call that returns 0 on success; otherwise returns Internal naming `what`
// (a singular matrix from a generator that promises invertible submatrices is a bug).
#define MEMENTO_ISAL_CHECK(call, what)                                                        \
  do {                                                                                        \
    const int _memento_isal_rc = (call);                                                      \
    if (_memento_isal_rc != 0) {                                                              \
      return ::memento::Internal(std::string(what) + ": ISA-L returned " +                    \
                                 std::to_string(_memento_isal_rc));                           \
    }                                                                                         \
  } while (0)
