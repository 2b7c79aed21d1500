#!/usr/bin/env python3
"""The side-by-side benchmark (issue 7): one GPU, one model, the iteration time of
  none       no checkpointing
  memento    memento snapshot every iteration (its own agent, started here)
  torch.save torch.save of model + optimizer state every iteration (to --dir)
  dcp        torch.distributed.checkpoint.async_save every iteration (waiting for the previous one)
and the ratios: each mode's overhead over `none`, and memento's stall (extra time per iteration)
against each peer's. Goals: overhead <= 1%; stall <= 1/20 of async_save's and <= 1/100 of
torch.save's. `--json` ends with one line of JSON.

    MEMENTO_BIN_DIR=build/bin python3 bench/pytorch_overhead.py --layers 12 --hidden 1024
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "../python"))
sys.path.insert(0, os.path.join(HERE, "../examples/pytorch"))
import memento  # noqa: E402
from gpt import GPT, batch  # noqa: E402


def start_agent(tmp, job, extra):
    bin_dir = os.environ.get("MEMENTO_BIN_DIR", os.path.join(HERE, "../build/bin"))
    sock = os.path.join(tmp, "agent-%n.sock")
    log = open(os.path.join(tmp, "agent.log"), "w")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.Popen(["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "1",
                             os.path.join(bin_dir, "memento-agent"), "--job",
                             job, "--socket", sock, "--catalog", os.path.join(tmp, "catalog-%n")] + extra,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 60
    while not os.path.exists(sock.replace("%n", "0")):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("memento-agent did not start; see " + log.name)
        time.sleep(0.05)
    return proc, sock


def run(mode, args, ckpt_dir, sock=None, job=None):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = GPT(args.vocab, args.seq, args.layers, args.hidden, args.heads).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    client = None
    if mode == "memento":
        client = memento.Client(agent_socket=sock, job_id=job, rank=0, local_rank=0, world_size=1)
        client.register_module(model)
        client.register_optimizer(opt, model)
        client.finish_registration()
    pending = None
    times = []
    for step in range(1, args.warmup + args.iters + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x, y = batch(step, 0, args.batch, args.seq, args.vocab, dev)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        if pending is not None and mode == "dcp":
            pending.result()  # the previous async save must finish before the state changes
            pending = None
        opt.step()
        opt.zero_grad(set_to_none=False)
        if mode == "memento" and step % args.every == 0:
            client.snapshot(step)
        elif mode == "torch.save" and step % args.every == 0:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, os.path.join(ckpt_dir, "ckpt.pt"))
        elif mode == "dcp" and step % args.every == 0:
            import torch.distributed.checkpoint as dcp
            pending = dcp.async_save({"model": model.state_dict(), "optim": opt.state_dict()},
                                     checkpoint_id=os.path.join(ckpt_dir, "dcp-%d" % (step % 2)))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if pending is not None:
        pending.result()
    if client is not None:
        client.wait_until_safe_to_update()
        client.close()
    params = sum(p.numel() for p in model.parameters())
    del model, opt
    torch.cuda.empty_cache()
    t = times[args.warmup:]
    return sum(t) / len(t), params  # the mean: a stall every K iterations counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dir", default=None, help="checkpoint directory of torch.save and dcp (default: a temp dir)")
    ap.add_argument("--modes", default="none,memento,torch.save,dcp")
    ap.add_argument("--every", type=int, default=1, help="checkpoint every K iterations (default 1)")
    ap.add_argument("--agent-arg", action="append", default=[], help="one more memento-agent argument")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 3
    tmp = tempfile.mkdtemp(prefix="memento-overhead-")
    ckpt = args.dir or os.path.join(tmp, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    job = "overhead-%d" % os.getpid()
    agent, sock = start_agent(tmp, job, args.agent_arg)
    if "dcp" in args.modes:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    res = {}
    try:
        for mode in args.modes.split(","):
            res[mode], params = run(mode, args, ckpt, sock, job)
            print("%-11s %8.2f ms/iteration" % (mode, res[mode] * 1e3), flush=True)
    finally:
        agent.terminate()
        agent.wait()
        for f in os.listdir("/dev/shm"):
            if f.startswith("memento-" + job + "-"):
                os.unlink(os.path.join("/dev/shm", f))
        shutil.rmtree(tmp, ignore_errors=True)
    base = res["none"]
    stall = {m: max(res[m] - base, 0.0) for m in res}
    out = {"bench": "pytorch_overhead", "gpu": torch.cuda.get_device_name(0), "params": params,
           "state_bytes": 12 * params, "layers": args.layers, "hidden": args.hidden, "seq": args.seq,
           "batch": args.batch, "iters": args.iters, "every": args.every, "agent_args": " ".join(args.agent_arg)}
    for m in res:
        out[m.replace(".", "_") + "_ms"] = round(res[m] * 1e3, 3)
        out[m.replace(".", "_") + "_overhead"] = round(res[m] / base - 1, 5)
    print("model: %d parameters, %.2f GB of fp32 state (params + AdamW moments)" % (params, 12 * params / 1e9))
    if "memento" in res:
        print("memento overhead: %.2f%% (goal <= 1%%)" % (100 * (res["memento"] / base - 1)))
        for peer, goal in (("dcp", 20), ("torch.save", 100)):
            if peer in res and stall[peer] > 0:
                ratio = stall["memento"] / stall[peer]
                out["stall_vs_" + peer.replace(".", "_")] = round(ratio, 5)
                print("memento stall / %s stall: %.4f (goal <= 1/%d = %.4f)" % (peer, ratio, goal, 1 / goal))
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
