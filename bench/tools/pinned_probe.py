#!/usr/bin/env python3
"""D2H copy rate in a PyTorch process into (1) torch's pinned memory, (2) a /dev/shm mapping
registered with cudaHostRegister (what memento's slots are), (3) the same mapping unregistered."""
import ctypes
import mmap
import os
import time

import torch

n = int(2.63e9)
src = torch.empty(n, dtype=torch.uint8, device="cuda")


def rate(dst):
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return n / dt / 1e9


pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
print("torch pinned:            %.1f GB/s" % rate(pinned), flush=True)
path = "/dev/shm/memento-probe-%d" % os.getpid()
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, n)
m = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
buf = (ctypes.c_char * n).from_buffer(m)
addr = ctypes.addressof(buf)
ctypes.memset(addr, 0, n)  # populate
shm = torch.frombuffer(buf, dtype=torch.uint8)
print("shm, not registered:     %.1f GB/s" % rate(shm), flush=True)
cudart = torch.cuda.cudart()
chunk = 64 << 20
for off in range(0, n, chunk):
    r = cudart.cudaHostRegister(addr + off, min(chunk, n - off), 1)  # cudaHostRegisterPortable
    assert int(r) == 0, r
one = torch.frombuffer(buf, dtype=torch.uint8, count=chunk)
src_small = src[:chunk]
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(20):
    one.copy_(src_small, non_blocking=True)
torch.cuda.synchronize()
print("shm, registered, within one chunk: %.1f GB/s" % (20 * chunk / (time.perf_counter() - t0) / 1e9), flush=True)
os.unlink(path)
