"""DistributedDataParallel on CPU (gloo, 2 processes): each rank runs half the batch, and the
averaged gradients equal one process's gradients over the whole batch.

The spatial norm runs in eval mode here: with per-rank batches, a training-mode BatchNorm's
statistics differ from the full batch's by design (SyncBatchNorm is what fixes that, and it needs
a GPU; its conversion is tested in test_cbam.py). Everything else trains normally.
"""
import datetime
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cbam_triton import CBAM

WORLD = 2


def build_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), CBAM(10, rd_channels=3), nn.ReLU(),
                          nn.Conv2d(10, 4, 1))
    model.train()
    model[1].spatial.conv.bn.eval()
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 7, 9, generator=g), torch.randn(4, 4, 7, 9, generator=g)


def loss_of(model, x, target):
    return ((model(x) - target) ** 2).mean()


def _rank(rank, port, out_dir):
    def reached(stage):  # where each rank got to, for the parent's message if one stalls
        with open(os.path.join(out_dir, f"rank{rank}.stage"), "w") as f:
            f.write(stage)

    reached("started")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # A bounded timeout: a rank that waits on a dead peer fails instead of hanging the suite.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        reached("joined the group")
        model = nn.parallel.DistributedDataParallel(build_model())
        x, target = batch()
        half = x.shape[0] // WORLD
        part = slice(rank * half, (rank + 1) * half)
        loss_of(model, x[part], target[part]).backward()
        reached("ran backward")
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(grads, path + ".tmp")
        os.replace(path + ".tmp", path)  # appears whole, for the parent polling for it
        reached("saved its gradients")
    finally:
        dist.destroy_process_group()


def stages(out_dir):
    reached = {}
    for r in range(WORLD):
        path = os.path.join(out_dir, f"rank{r}.stage")
        reached[f"rank {r}"] = open(path).read() if os.path.exists(path) else "not started"
    return reached


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one():
    model = build_model()
    x, target = batch()
    loss_of(model, x, target).backward()  # mean over the batch = DDP's average of half-means
    expected = {n: p.grad for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as out_dir:
        processes = mp.spawn(_rank, args=(free_port(), out_dir), nprocs=WORLD, join=False)
        results = [os.path.join(out_dir, f"rank{r}.pt") for r in range(WORLD)]
        deadline = time.monotonic() + 300
        try:
            # Wait for the results, not for the processes to exit: what is tested is the
            # gradients. join() still raises at once if a rank fails.
            while not all(os.path.exists(r) for r in results):
                processes.join(timeout=1)
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"the DDP ranks did not finish in 300 s: {stages(out_dir)}")
            per_rank = [torch.load(r) for r in results]
        finally:
            for p in processes.processes:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
    for name, grad in expected.items():
        for rank in range(WORLD):
            torch.testing.assert_close(per_rank[rank][name], grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")
