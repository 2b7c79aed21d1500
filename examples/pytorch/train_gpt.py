#!/usr/bin/env python3
"""Trains a GPT-style model (torch.nn, AdamW, bf16 autocast, synthetic data) with memento taking a
snapshot every iteration. One GPU, or DDP on several GPUs launched through memento-run:

    python3 examples/pytorch/train_gpt.py --steps 50                     # needs an agent (MEMENTO_*)
    build/bin/memento-run --simulate-nodes 1 --ranks-per-node 2 -- \\
        python3 examples/pytorch/train_gpt.py --steps 50 --ddp           # 2 GPUs, DDP

On a restart memento-run sets MEMENTO_RESTORE=latest: the script resumes from the newest version
(parameters, AdamW state, RNG and the data position) and prints the same final `param_hash` as a
run that never stopped.
"""
import argparse
import hashlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memento  # noqa: E402
from gpt import GPT, batch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--snapshot-every", type=int, default=1)
    ap.add_argument("--no-memento", action="store_true")
    ap.add_argument("--ddp", action="store_true", help="torch.distributed (NCCL) over the launcher's ranks")
    args = ap.parse_args()

    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    if args.ddp:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        torch.distributed.init_process_group("nccl" if device != "cpu" else "gloo", rank=rank, world_size=world)

    torch.manual_seed(1234)
    model = GPT(args.vocab, args.seq, args.layers, args.hidden, args.heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    train = torch.nn.parallel.DistributedDataParallel(model) if args.ddp else model
    params = sum(p.numel() for p in model.parameters())

    client = None
    done = 0
    position = {"step": 0}
    if not args.no_memento:
        client = memento.Client()
        # DDP replicas hold the same state: replica rank r > 0 is not written to storage.
        client.register_module(model, replica_id=rank)
        client.register_optimizer(opt, model, replica_id=rank)
        client.register_rng()
        client.register_blob("data", 64, get=lambda: str(position["step"]).encode(),
                             set=lambda b: position.__setitem__("step", int(b)))
        client.finish_registration()
        done = client.restore_if_any()
        if done and position["step"] != done:
            raise SystemExit("data position %d does not match the restored step %d" % (position["step"], done))
        if rank == 0 and done:
            print("restored step=%d" % done, flush=True)
    if rank == 0:
        print("params=%d state_bytes=%d world=%d device=%s" % (params, 3 * 4 * params, world, device), flush=True)

    times = []
    for step in range(done + 1, args.steps + 1):
        t0 = time.perf_counter()
        x, y = batch(step, rank, args.batch, args.seq, args.vocab, device)
        with torch.autocast(device_type="cuda" if device != "cpu" else "cpu", dtype=torch.bfloat16):
            loss = train(x, y)
        loss.backward()
        opt.step()                      # memento's pre-step hook waits for the last snapshot's copy
        opt.zero_grad(set_to_none=False)
        position["step"] = step
        if client is not None and args.snapshot_every and step % args.snapshot_every == 0:
            client.snapshot(step)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if rank == 0 and (step % 10 == 0 or step == args.steps):
            print("step %d loss=%.4f ms=%.1f" % (step, loss.item(), times[-1] * 1e3), flush=True)
    if client is not None:
        client.wait_until_safe_to_update()
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    if rank == 0:
        if len(times) > 5:
            print("avg_step_ms=%.2f" % (1e3 * sum(times[5:]) / len(times[5:])))
        print("param_hash=%s" % h.hexdigest()[:16], flush=True)
    if client is not None:
        client.close()
    if args.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
