"""GPU busy time against wall time of the training step, for one run and K runs packed.

    python scripts/profile_step.py MODEL K COMPILE      # e.g. resnet20x1 4 reduce-overhead

Prints ms per round (one step of every run), the GPU's busy time (union of kernel intervals,
from torch.profiler over 20 rounds), the plain sum of kernel times (union < sum means kernels
of different runs overlapped) and kernels per round. DEV=cpu runs it without a GPU (no kernel
figures), to check the script itself. docs/performance.md quotes its output.
"""
import contextlib
import os
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from lambdapipe.augment import DeviceImages, augmented_batch, channel_stats, plan_epoch
from lambdapipe.models import create_model
from lambdapipe.recipes import get_recipe
from lambdapipe.runtime import resolve
from lambdapipe.step import build

name, pack, compile_ = sys.argv[1], int(sys.argv[2]), sys.argv[3]
D = os.environ.get("DEV", "cuda")
dev = torch.device(D) if D == "cuda" else None
r = get_recipe("sgdm", {"batch_size": 256, "precision": "bf16",
                        "compile": False if compile_ == "off" else compile_})
rt = resolve(r, D)
rng = np.random.default_rng(0)
imgs = rng.integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8)
labels = rng.integers(0, 10, 4096)
runs = []
for seed in range(pack):
    # each run on its own CUDA stream, as the streams pack (dropped in issue 23) ran them
    stream = torch.cuda.Stream(device=dev) if dev is not None else None

    def lane(s=stream):
        return torch.cuda.stream(s) if s is not None else contextlib.nullcontext()
    with lane():
        data = DeviceImages(imgs, labels, labels, D, pad=4)
        mean, std = (torch.tensor(v, device=D) for v in channel_stats(imgs))
        torch.manual_seed(seed)
        m = create_model(name, num_classes=10, image_size=32)
        m, _, step = build(m, r, rt.with_model(m, 32), mean, std)
        plan = plan_epoch(len(data), seed, 0, 4, True, D)
    runs.append((lane, data, step, plan))


def round_(i):
    for lane, data, step, plan in runs:
        with lane():
            x, y, yc = augmented_batch(data, plan, i % 15, 256)
            step(x, y, yc, 0.1, i)


with rt.kernels():
    for i in range(int(os.environ.get("WARM", 25))):
        round_(i)
    (torch.cuda.synchronize() if dev is not None else None)
    t0 = time.perf_counter()
    for i in range(25, 25 + int(os.environ.get("N", 50))):
        round_(i)
    (torch.cuda.synchronize() if dev is not None else None)
    wall = (time.perf_counter() - t0) / 50
    # CPU time to issue a round (no sync): how long the host takes
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        (torch.cuda.synchronize() if dev is not None else None)
        t1 = time.perf_counter()
        for i in range(75, 95):
            round_(i)
        issue = (time.perf_counter() - t1) / 20
        (torch.cuda.synchronize() if dev is not None else None)
        pwall = (time.perf_counter() - t1) / 20
kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
ivs = sorted((e.time_range.start, e.time_range.end) for e in kernels)
busy, cur_s, cur_e = 0.0, None, None
for s, e in ivs:
    if cur_e is None or s > cur_e:
        if cur_e is not None:
            busy += cur_e - cur_s
        cur_s, cur_e = s, e
    else:
        cur_e = max(cur_e, e)
if cur_e is not None:
    busy += cur_e - cur_s
ksum = sum(e - s for s, e in ivs)
print(f"{name} pack={pack} compile={compile_}: wall {wall*1e3:.2f} ms/round "
      f"({60/wall*pack:.0f} iter/min total); under profiler: host issue {issue*1e3:.2f} ms/round, "
      f"wall {pwall*1e3:.2f}; GPU busy (union) {busy/20/1e3:.2f} ms/round, kernel sum "
      f"{ksum/20/1e3:.2f} ms/round, {len(kernels)/20:.0f} kernels/round")
