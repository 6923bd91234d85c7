"""Device check of the random-resized crop (run on a CUDA machine, from the repository root):
the epoch plan is identical on CPU and CUDA, CUDA batches agree with CPU batches to rounding,
the full box is the identity, a batch repeats exactly, and what one batch costs.

    PYTHONPATH=$PWD python scripts/gpu_aug_check.py
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

sys.path.insert(0, "tests")
from test_augment import pattern_images  # noqa: E402

from lambdapipe.augment import DeviceImages, augmented_batch, plan_epoch  # noqa: E402

RRC = ((0.08, 1.0), (3 / 4, 4 / 3))


def main() -> None:
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
    imgs = pattern_images(512, 128)
    lab = np.arange(512) % 10
    cpu = DeviceImages(imgs, lab, lab, "cpu")
    gpu = DeviceImages(imgs, lab, lab, "cuda")
    pc = plan_epoch(512, 0, 3, 0, True, "cpu", resized_crop=RRC, size=128)
    pg = plan_epoch(512, 0, 3, 0, True, "cuda", resized_crop=RRC, size=128)
    same = all(torch.equal(getattr(pc, f), getattr(pg, f).cpu())
               for f in ("order", "dy", "dx", "flip", "h", "w"))
    print("plan identical on cpu and cuda:", same)
    d = torch.cat([(augmented_batch(cpu, pc, s, 64)[0].int()
                    - augmented_batch(gpu, pg, s, 64)[0].cpu().int()).abs().flatten()
                   for s in range(8)])
    print("cpu vs cuda: max |diff|", int(d.max()), "fraction differing",
          float((d > 0).float().mean()))
    full = plan_epoch(512, 0, 0, 0, False, "cuda", resized_crop=((1.0, 1.0), (1.0, 1.0)),
                      size=128)
    print("identity on cuda:",
          torch.equal(augmented_batch(gpu, full, 0, 64)[0], gpu.images[full.order[:64]]))
    print("cuda batch repeats:", torch.equal(augmented_batch(gpu, pg, 1, 64)[0],
                                             augmented_batch(gpu, pg, 1, 64)[0]))
    padded = DeviceImages(imgs, lab, lab, "cuda", pad=4)
    for name, plan, data in (("random-resized-crop", pg, gpu),
                             ("crop pad 4", plan_epoch(512, 0, 3, 4, True, "cuda"), padded)):
        for _ in range(5):
            augmented_batch(data, plan, 0, 64)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(200):
            augmented_batch(data, plan, i % 8, 64)
        torch.cuda.synchronize()
        print(f"{name}: batch 64 x 128 px, {(time.perf_counter() - t) / 200 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
