#!/usr/bin/env python3
"""Copy rate of memento's snapshot inside a PyTorch process for a given set of CUDA tensors
(diagnostic): one big tensor, N equal tensors, or the GPT model's parameters and moments."""
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "../../python"))
import memento  # noqa: E402

if "--preload" in sys.argv:  # libmemento.so (and its libcudart) before torch's
    memento._lib.lib()
import torch  # noqa: E402
import pytorch_overhead as po  # noqa: E402

total = int(2.63e9) // 4
for label, sizes in (("1 tensor", [total]),):
    tmp = tempfile.mkdtemp(prefix="memento-shapes-")
    job = "shapes-%d-%d" % (os.getpid(), len(sizes))
    agent, sock = po.start_agent(tmp, job, [])
    ts = [torch.zeros(n, device="cuda") for n in sizes]
    c = memento.Client(agent_socket=sock, job_id=job, rank=0, local_rank=0, world_size=1)
    for i, t in enumerate(ts):
        c.register_tensor("t%d" % i, t)
    c.finish_registration()
    waits = []
    for step in range(1, 9):
        time.sleep(0.06)
        t0 = time.perf_counter()
        c.wait_until_safe_to_update()
        waits.append(time.perf_counter() - t0)
        c.snapshot(step)
    c.wait_until_safe_to_update()
    c.close()
    agent.terminate()
    agent.wait()
    print("%-10s waits after 60 ms: %s ms" % (label, " ".join("%.0f" % (w * 1e3) for w in waits[2:])), flush=True)
    del ts
    torch.cuda.empty_cache()
