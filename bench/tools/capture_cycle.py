#!/usr/bin/env python3
"""Where a snapshot-every-iteration cycle spends its time (diagnostic for bench/pytorch_overhead.py):
per iteration, the time in snapshot() and in the optimizer's wait, and the agent's debug log."""
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "../../python"))
sys.path.insert(0, os.path.join(HERE, "../../examples/pytorch"))
import memento  # noqa: E402
import pytorch_overhead as po  # noqa: E402
from gpt import GPT, batch  # noqa: E402

tmp = tempfile.mkdtemp(prefix="memento-cycle-")
job = "cycle-%d" % os.getpid()
import argparse  # noqa: E402
ap = argparse.ArgumentParser()
ap.add_argument("--sleep", action="store_true", help="sleep instead of forward/backward (GPU idle)")
ap.add_argument("--no-optimizer", action="store_true", help="register the parameters only")
ap.add_argument("--no-host", action="store_true", help="leave out the optimizer's host 'step' tensors")
ap.add_argument("--settle", type=float, default=0, help="seconds to wait after registration")
ap.add_argument("agent_args", nargs="*")
cli = ap.parse_args()
agent, sock = po.start_agent(tmp, job, ["--log-level", "debug"] + cli.agent_args)
dev = torch.device("cuda")
model = GPT(32768, 1024, 12, 1024, 16).to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
c = memento.Client(agent_socket=sock, job_id=job, rank=0, local_rank=0, world_size=1)
c.register_module(model)
if not cli.no_optimizer:
    if cli.no_host:
        for name, p in model.named_parameters():
            st = opt.state[p]
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] = torch.tensor(0.0)
            c.register_tensor(name + ".exp_avg", st["exp_avg"])
            c.register_tensor(name + ".exp_avg_sq", st["exp_avg_sq"])
    else:
        c.register_optimizer(opt, model, hook=False)
c.finish_registration()
time.sleep(cli.settle)
t_start = time.perf_counter()
for step in range(1, 16):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if cli.sleep:
        time.sleep(0.057)
    else:
        x, y = batch(step, 0, 16, 1024, 32768, dev)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    c.wait_until_safe_to_update()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=False)
    t3 = time.perf_counter()
    c.snapshot(step)
    t4 = time.perf_counter()
    print("step %2d at %7.1f ms: fwd+bwd %.1f, wait %.1f, opt %.1f, snapshot() %.1f" %
          (step, (t0 - t_start) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3), flush=True)
c.wait_until_safe_to_update()
c.close()
agent.terminate()
agent.wait()
with open(os.path.join(tmp, "agent.log")) as f:
    lines = [l for l in f if "complete" in l or "slot" in l.lower()]
print("".join(lines[:60]))
