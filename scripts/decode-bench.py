"""ImageNet at 224 px: how many training images a second the stream decodes and crops, on the
CPU through lambdapipe.feed's DataLoader (no workers, then `loader_workers: auto`) and, on a
CUDA device, with nvJPEG (`jpeg_decode: gpu`: the workers read, the GPU decodes and crops).
Compare with a training step's images/s (scripts/gpu-bench.sh `step`, docs/imagenet.md):
when the CPU figure is below it, the node's CPUs starve its GPUs.

    python scripts/decode-bench.py OUT DEVICE [IMAGES] [BATCH]

writes OUT/decode224.{txt,json}. The JPEGs are generated at ImageNet's typical size (500 x 375,
quality 90, smooth content with noise), held in memory: the figure is decode + crop, not disk.
"""

from __future__ import annotations

import datetime
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lambdapipe import feed
from lambdapipe.data.stream import JpegSplit
from lambdapipe.recipes import get_recipe


class MemorySplit(JpegSplit):
    """A JpegSplit over JPEG bytes in memory (the bench's stand-in for a prepared index)."""

    def __init__(self, jpegs: list[bytes], size: int = 224):
        self.blobs, self.size = jpegs, size
        self.labels = np.zeros(len(jpegs), dtype=np.int64)

    def jpeg(self, i: int) -> bytes:
        return self.blobs[i]


def jpegs(n: int, w: int = 500, h: int = 375) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        phase = rng.uniform(0, 6.3, 3)
        base = np.stack([127 + 100 * np.sin(xx / (20 + 9 * c) + yy / 31 + phase[c])
                         for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rate(stream: feed.TrainStream, steps: int, device: str) -> float:
    stream.batch(0, 0)  # workers started, first batches decoded: not timed
    start = time.perf_counter()
    for s in range(1, steps):
        stream.batch(0, s)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (steps - 1) * stream.r.batch_size / (time.perf_counter() - start)


def main() -> None:
    out, device = Path(sys.argv[1]), sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    split = MemorySplit(jpegs(n))
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else device
    rows = []
    decodes = [("cpu", 0), ("cpu", feed.workers("auto"))]
    if device.startswith("cuda"):  # the workers read, nvJPEG decodes in this process
        decodes.append(("gpu", feed.workers("auto")))
    else:
        print("decode-bench: nvJPEG skipped: not a CUDA device", file=sys.stderr)
    for decode, workers in dict.fromkeys(decodes):
        r = get_recipe("sgdm-imagenet2012", {"batch_size": batch, "loader_workers": workers,
                                             "jpeg_decode": decode})
        stream = feed.TrainStream(split, r, 0, None, device, n // batch)
        rows.append({"device_name": name, "decode": "nvjpeg" if decode == "gpu" else decode,
                     "workers": workers, "images_per_s": rate(stream, n // batch, device)})
    text = ("decode   workers  images/s (224 px random-resized crop + flip, 500x375 JPEGs)\n"
            + "".join(f"{r['decode']:<7}  {r['workers']:>7}  {r['images_per_s']:>8.0f}\n"
                      for r in rows))
    print(text, end="")
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode224.txt").write_text(text)
    (out / "decode224.json").write_text(json.dumps({
        "torch": torch.__version__, "rows": rows, "images": n, "batch_size": batch,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}))


if __name__ == "__main__":
    main()
