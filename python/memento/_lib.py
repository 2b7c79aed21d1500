"""Loads libmemento.so and declares the C API's prototypes (snapshot/memento.h)."""
import ctypes
import ctypes.util
import os

_lib = None


def _candidates():
    env = os.environ.get("MEMENTO_LIBRARY")
    if env:
        yield env
    here = os.path.dirname(os.path.abspath(__file__))
    # Installed next to a memento prefix (<prefix>/lib/python3/...), or a source tree's build/.
    for up in ("../../../lib", "../../../../lib", "../../build/lib"):
        yield os.path.normpath(os.path.join(here, up, "libmemento.so"))
    found = ctypes.util.find_library("memento")
    if found:
        yield found


def lib():
    """The loaded library; OSError naming every place tried when none loads."""
    global _lib
    if _lib is not None:
        return _lib
    tried = []
    for path in _candidates():
        try:
            handle = ctypes.CDLL(path)
        except OSError as e:
            tried.append("%s (%s)" % (path, e))
            continue
        _declare(handle)
        _lib = handle
        return _lib
    raise OSError("cannot load libmemento.so; set MEMENTO_LIBRARY to its path. Tried: " + "; ".join(tried))


def _declare(h):
    c = ctypes
    i64p = c.POINTER(c.c_int64)
    h.memento_last_error.restype = c.c_char_p
    h.memento_last_error.argtypes = []
    h.memento_connect.restype = c.c_int
    h.memento_connect.argtypes = [c.c_char_p, c.c_char_p, c.c_char_p, c.c_int, c.c_int, c.c_int, c.POINTER(c.c_void_p)]
    h.memento_close.restype = None
    h.memento_close.argtypes = [c.c_void_p]
    h.memento_register_tensor.restype = c.c_int
    h.memento_register_tensor.argtypes = [c.c_void_p, c.c_char_p, c.c_void_p, c.c_size_t, c.c_int, c.c_int, i64p,
                                          i64p, i64p, c.c_int, c.c_int, c.c_int]
    h.memento_register_flat.restype = c.c_int
    h.memento_register_flat.argtypes = [c.c_void_p, c.c_char_p, c.c_void_p, c.c_size_t, c.c_int, c.c_int, i64p,
                                        c.c_int64, c.c_int64, c.c_int, c.c_int, c.c_int]
    h.memento_register_blob.restype = c.c_int
    h.memento_register_blob.argtypes = [c.c_void_p, c.c_char_p, c.c_void_p, c.c_size_t, c.POINTER(c.c_size_t)]
    h.memento_finish_registration.restype = c.c_int
    h.memento_finish_registration.argtypes = [c.c_void_p]
    h.memento_snapshot.restype = c.c_int
    h.memento_snapshot.argtypes = [c.c_void_p, c.c_int64]
    h.memento_wait_until_safe_to_update.restype = c.c_int
    h.memento_wait_until_safe_to_update.argtypes = [c.c_void_p]
    h.memento_restore.restype = c.c_int
    h.memento_restore.argtypes = [c.c_void_p, c.c_int64, i64p]
