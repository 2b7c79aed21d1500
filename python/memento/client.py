"""The memento client for Python: the calls of snapshot/client.h over the C API.

Buffers are anything that exposes a writable buffer (bytearray, array.array, memoryview, numpy
arrays) or a torch.Tensor (host or CUDA, contiguous). Registered buffers must stay alive and keep
their address until the client is closed: the agent's copies read them in the background between
snapshot() and wait_until_safe_to_update().
"""
import ctypes
import os

from . import _lib

# dtype codes (snapshot/memento.h)
F64, F32, F16, BF16, F8E4M3, F8E5M2, I64, I32, I8, U8, BOOL = range(1, 12)
_DTYPE_SIZE = {F64: 8, F32: 4, F16: 2, BF16: 2, F8E4M3: 1, F8E5M2: 1, I64: 8, I32: 4, I8: 1, U8: 1, BOOL: 1}
# array.array / memoryview format characters
_FORMAT_DTYPE = {"d": F64, "f": F32, "e": F16, "q": I64, "l": I64, "i": I32, "b": I8, "B": U8, "?": BOOL}
HOST, CUDA = 0, 1
LATEST = -1

_CODE_NAMES = {1: "InvalidArgument", 2: "NotFound", 3: "AlreadyExists", 4: "FailedPrecondition",
               5: "ResourceExhausted", 6: "DataLoss", 7: "Unavailable", 8: "PermissionDenied",
               9: "NotSupported", 10: "IOError", 11: "Aborted", 12: "Internal", 13: "Timeout"}


class MementoError(RuntimeError):
    """A failed memento call: `code` (core/status.h) and the agent's or library's message."""

    def __init__(self, code, message):
        self.code = code
        self.code_name = _CODE_NAMES.get(code, "Unknown")
        self.message = message
        super().__init__("%s: %s" % (self.code_name, message))


class NothingToRestore(MementoError):
    """restore() found no complete version (a first start)."""


def _check(rc):
    if rc != 0:
        msg = _lib.lib().memento_last_error()
        msg = msg.decode("utf-8", "replace") if msg else ""
        prefix = _CODE_NAMES.get(rc, "") + ": "
        if msg.startswith(prefix):
            msg = msg[len(prefix):]  # the C API's text is Status::ToString(): the code is ours
        if rc == 2:
            raise NothingToRestore(rc, msg)
        raise MementoError(rc, msg)


def _torch():
    try:
        import torch  # noqa: F401
        return torch
    except ImportError:
        return None


def _is_tensor(obj):
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


def _torch_dtype_code(t):
    torch = _torch()
    table = {torch.float64: F64, torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16,
             torch.int64: I64, torch.int32: I32, torch.int8: I8, torch.uint8: U8, torch.bool: BOOL}
    for name, code in (("float8_e4m3fn", F8E4M3), ("float8_e5m2", F8E5M2)):
        if hasattr(torch, name):
            table[getattr(torch, name)] = code
    if t.dtype not in table:
        raise MementoError(1, "tensor dtype %s is not supported by memento" % t.dtype)
    return table[t.dtype]


def _buffer(obj, dtype):
    """(address, bytes, dtype, memory kind, device, keepalive) of a registrable buffer."""
    if _is_tensor(obj):
        if not obj.is_contiguous():
            raise MementoError(1, "tensor is not contiguous: register a contiguous tensor (it must keep its storage)")
        code = dtype if dtype is not None else _torch_dtype_code(obj)
        kind, device = (CUDA, obj.device.index or 0) if obj.is_cuda else (HOST, 0)
        return obj.data_ptr(), obj.numel() * obj.element_size(), code, kind, device, obj
    view = memoryview(obj)
    if view.readonly:
        raise MementoError(1, "buffer is read-only: memento restores into it, so it must be writable")
    if not view.c_contiguous:
        raise MementoError(1, "buffer is not C-contiguous")
    code = dtype if dtype is not None else _FORMAT_DTYPE.get(view.format)
    if code is None:
        raise MementoError(1, "cannot tell the dtype of a buffer of format %r: pass dtype=" % view.format)
    nbytes = view.nbytes
    holder = (ctypes.c_char * nbytes).from_buffer(view.cast("B")) if nbytes > 0 else None
    address = ctypes.addressof(holder) if holder is not None else None
    return address, nbytes, code, HOST, 0, (view, holder)


def _int64s(values):
    if values is None:
        return None
    arr = (ctypes.c_int64 * len(values))(*[int(v) for v in values])
    return arr


class Blob:
    """A named byte string saved with every snapshot and given back by restore(): set() before
    snapshot(), value after restore(). Capacity is fixed at registration."""

    def __init__(self, name, capacity):
        self.name = name
        self.capacity = capacity
        self._buf = (ctypes.c_char * max(capacity, 1))()
        self._size = ctypes.c_size_t(0)

    def set(self, data):
        data = bytes(data)
        if len(data) > self.capacity:
            raise MementoError(1, "blob '%s' holds at most %d bytes, got %d" % (self.name, self.capacity, len(data)))
        ctypes.memmove(self._buf, data, len(data))
        self._size.value = len(data)

    @property
    def value(self):
        return ctypes.string_at(self._buf, self._size.value)


class Client:
    """One rank's connection to its node's agent. Every argument left None / -1 comes from the
    environment memento-run sets (MEMENTO_AGENT_SOCKET, MEMENTO_JOB_ID, MEMENTO_JOB_TOKEN,
    OMPI_COMM_WORLD_RANK / SLURM_PROCID, ...)."""

    def __init__(self, agent_socket=None, job_id=None, job_token=None, rank=-1, local_rank=-1, world_size=-1):
        L = _lib.lib()
        self._h = ctypes.c_void_p()
        enc = lambda s: s.encode() if s is not None else None  # noqa: E731
        _check(L.memento_connect(enc(agent_socket), enc(job_id), enc(job_token), rank, local_rank, world_size,
                                 ctypes.byref(self._h)))
        self._keep = []          # buffers the agent's copies read
        self._blobs = {}
        self._savers = []        # (blob, get) called before each snapshot
        self._loaders = []       # (blob, set) called after a restore
        self._finished = False

    # ---- registration -------------------------------------------------------------------------

    def register_tensor(self, name, buffer, dtype=None, global_shape=None, offsets=None, lengths=None,
                        replica_id=0):
        """Registers `buffer` as the box [offsets, offsets + lengths) of a global tensor of shape
        `global_shape` (row-major); without offsets/lengths, the whole tensor. global_shape
        defaults to a torch tensor's shape, or [elements] for a flat buffer."""
        address, nbytes, code, kind, device, keep = _buffer(buffer, dtype)
        if global_shape is None:
            global_shape = list(buffer.shape) if _is_tensor(buffer) else [nbytes // _DTYPE_SIZE[code]]
        if (offsets is None) != (lengths is None):
            raise MementoError(1, "tensor '%s': give both offsets and lengths, or neither" % name)
        shape = _int64s(global_shape)
        _check(_lib.lib().memento_register_tensor(self._h, name.encode(), address, nbytes, code, len(global_shape),
                                                  shape, _int64s(offsets), _int64s(lengths), replica_id, kind,
                                                  device))
        self._keep.append(keep)

    def register_flat(self, name, buffer, global_shape, flat_begin, flat_length=None, dtype=None, replica_id=0):
        """Registers `buffer` as elements [flat_begin, flat_begin + flat_length) of the row-major
        global tensor (a ZeRO flat partition)."""
        address, nbytes, code, kind, device, keep = _buffer(buffer, dtype)
        if flat_length is None:
            flat_length = nbytes // _DTYPE_SIZE[code]
        _check(_lib.lib().memento_register_flat(self._h, name.encode(), address, nbytes, code, len(global_shape),
                                                _int64s(global_shape), flat_begin, flat_length, replica_id, kind,
                                                device))
        self._keep.append(keep)

    def register_blob(self, name, capacity, get=None, set=None):
        """A blob of at most `capacity` bytes. With `get` (-> bytes) it is filled before every
        snapshot; with `set` (bytes ->) it is handed over after a restore."""
        blob = Blob(name, capacity)
        _check(_lib.lib().memento_register_blob(self._h, name.encode(), ctypes.cast(blob._buf, ctypes.c_void_p), capacity,
                                                ctypes.byref(blob._size)))
        self._blobs[name] = blob
        if get is not None:
            self._savers.append((blob, get))
        if set is not None:
            self._loaders.append((blob, set))
        return blob

    def finish_registration(self):
        """Collective over the job's ranks: returns once every rank registered."""
        _check(_lib.lib().memento_finish_registration(self._h))
        self._finished = True

    # ---- the loop -----------------------------------------------------------------------------

    def snapshot(self, step):
        """Starts capturing the registered state as version `step`; returns at once."""
        for blob, get in self._savers:
            blob.set(get())
        _check(_lib.lib().memento_snapshot(self._h, step))

    def wait_until_safe_to_update(self):
        """Blocks until the last snapshot's copy is done: call before mutating registered state."""
        _check(_lib.lib().memento_wait_until_safe_to_update(self._h))

    def restore(self, step=LATEST):
        """Restores version `step` (default: the newest complete one) into the registered buffers
        and returns its step. NothingToRestore when there is none."""
        out = ctypes.c_int64(-1)
        _check(_lib.lib().memento_restore(self._h, step, ctypes.byref(out)))
        for blob, load in self._loaders:
            load(blob.value)
        return out.value

    def restore_if_any(self):
        """restore() as memento-run asks (MEMENTO_RESTORE: latest, a step, or none): the restored
        step, or 0 when there is nothing to restore."""
        want = os.environ.get("MEMENTO_RESTORE", "latest")
        if want == "none":
            return 0
        try:
            return self.restore(LATEST if want in ("", "latest") else int(want))
        except NothingToRestore:
            return 0

    def close(self):
        if self._h:
            _lib.lib().memento_close(self._h)
            self._h = ctypes.c_void_p()
        self._keep = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- PyTorch ------------------------------------------------------------------------------

    def register_module(self, module, prefix="", replica_id=0):
        """Every parameter and persistent buffer of a torch.nn.Module, as whole tensors named by
        state_dict keys. Data-parallel replicas pass their DP index as replica_id (only replica 0
        is written to storage)."""
        names = []
        for name, p in module.named_parameters():
            self.register_tensor(prefix + name, p.data, replica_id=replica_id)
            names.append(prefix + name)
        for name, b in module.named_buffers():
            if b is not None and b.numel() > 0:
                self.register_tensor(prefix + name, b, replica_id=replica_id)
                names.append(prefix + name)
        return names

    def register_optimizer(self, optimizer, module, prefix="", replica_id=0, hook=True):
        """Adam/AdamW state (exp_avg, exp_avg_sq, step) of every parameter of `module`, named
        '<param>.exp_avg' etc. The state is created now (zeros, step 0) if the optimizer has not
        stepped yet. With hook=True, an optimizer pre-step hook calls wait_until_safe_to_update()."""
        torch = _torch()
        if torch is None:
            raise MementoError(9, "register_optimizer needs torch")
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            state = optimizer.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device) \
                    if getattr(optimizer, "defaults", {}).get("capturable", False) else torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.register_tensor(prefix + name + ".exp_avg", state["exp_avg"], replica_id=replica_id)
            self.register_tensor(prefix + name + ".exp_avg_sq", state["exp_avg_sq"], replica_id=replica_id)
            step = state["step"]
            if not torch.is_tensor(step):
                step = torch.tensor(float(step))
                state["step"] = step
            self.register_tensor(prefix + name + ".step", step.reshape(1) if step.dim() == 0 else step,
                                 global_shape=[1], replica_id=replica_id)
        if hook:
            optimizer.register_step_pre_hook(lambda *_: self.wait_until_safe_to_update())

    def register_rng(self, name="rng", capacity=1 << 16):
        """torch's CPU RNG state (and every CUDA device's) as a blob, saved with each snapshot and
        set back on restore."""
        torch = _torch()
        if torch is None:
            raise MementoError(9, "register_rng needs torch")
        import struct

        # Length-prefixed states: the CPU generator's, then each CUDA device's. No pickle: the
        # blob's bytes are only ever turned back into byte tensors.
        def get():
            states = [torch.get_rng_state()]
            if torch.cuda.is_available():
                states += list(torch.cuda.get_rng_state_all())
            out = bytearray(struct.pack("<I", len(states)))
            for st in states:
                raw = st.cpu().numpy().tobytes()
                out += struct.pack("<Q", len(raw)) + raw
            return bytes(out)

        def set(data):
            (count,) = struct.unpack_from("<I", data, 0)
            pos, states = 4, []
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", data, pos)
                states.append(torch.frombuffer(bytearray(data[pos + 8:pos + 8 + n]), dtype=torch.uint8))
                pos += 8 + n
            torch.set_rng_state(states[0])
            if len(states) > 1 and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states[1:])

        return self.register_blob(name, capacity, get=get, set=set)
