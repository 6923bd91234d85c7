"""Eval-mode output scale at init of the Imagenette study models, per lambda-convolution init.

For each model (full width, 10 classes, 128 px), seed and `pos_init` (lc models: 'normal' and
'torch_default'; rpe models and ResNets have one init), build the model with
torch.manual_seed(seed), put it in eval mode and run one fixed batch of standard-normal images
(the data's standardised scale; drawn from its own generator, the same for every model). It
prints one CSV row per model and init: the max |logit| and the cross-entropy against fixed
random labels, each as min/median/max over the seeds. docs/models.md ("Position init") quotes
its output.

    python scripts/init_scale.py --seeds 0 1 2 --batch 8 > init_scale.csv
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from lambdapipe.models import create_model

STUDY = [f"lr{d}_l{s}_{p}" for d in (18, 34) for s in (2, 3) for p in ("rpe", "lc")]


def measure(model: str, args: dict, seed: int, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(seed)
    net = create_model(model, 10, x.shape[-1], **args).eval()
    with torch.no_grad():
        logits = net(x).double()
    return logits.abs().max().item(), F.cross_entropy(logits, y).item()


def spread(values: list[float]) -> str:
    return f"{min(values):.3g}/{statistics.median(values):.3g}/{max(values):.3g}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet34", *STUDY])
    opts = ap.parse_args(argv)
    g = torch.Generator().manual_seed(12345)
    x = torch.randn(opts.batch, 3, opts.image_size, opts.image_size, generator=g)
    y = torch.randint(0, 10, (opts.batch,), generator=g)
    print("model,pos_init,seeds,max_abs_logit_min/median/max,cross_entropy_min/median/max")
    for model in opts.models:
        inits = ["normal", "torch_default"] if model.endswith("_lc") else [None]
        for init in inits:
            args = {} if init is None else {"pos_init": init}
            rows = [measure(model, args, s, x, y) for s in opts.seeds]
            print(f"{model},{init or '-'},{len(rows)},{spread([r[0] for r in rows])},"
                  f"{spread([r[1] for r in rows])}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
