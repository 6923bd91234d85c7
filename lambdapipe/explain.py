"""`lambdapipe explain`: where a trained network looks, and what a lambda layer learned.

For the first N images of a split (a fixed choice, so a ResNet and a Lambda-ResNet run of the
same dataset are shown on the same images) it computes two attribution maps of the predicted
class with the `grad-cam` package:

- FullGrad (Srinivas & Fleuret, 2019): input-gradient plus the bias-gradients of every
  Conv2d/BatchNorm2d, so it covers the lambda layers' own convolutions too;
- Grad-CAM (Selvaraju et al., 2017) at the output of the last stage, the coarsest map.

For the first lambda layer it also saves the learned position embeddings E (the paper's
relative position embeddings, parameter shape k x u x ...): for a lambda convolution (`lc`)
one r x r kernel per query-depth index k, for global relative positions (`rpe`) one
(2H-1) x (2W-1) table; no public implementation draws them.

Writes next to the checkpoint (or into --out), every file atomically:
  explain_<split>.npz             indices, images, labels, predictions, fullgrad, gradcam,
                                  position (k x u x a x b, absent without a lambda layer)
  explain_<split>.json            model, dataset, split, class names, indices, the layers used
  explain_<split>.{png,svg}       per image: input, FullGrad, Grad-CAM, predicted/true class
  explain_<split>_position.{png,svg}  the position embeddings, one panel per (u, k)
A run that diverged before its first evaluation has no best.ckpt: explain_<split>.json then
says so (status diverged) and nothing else is written; so does a model whose outputs are not
finite (status non-finite).
`lambdapipe report` reads only the .npz/.json (it imports no torch) for its side-by-side
figure of ResNet and Lambda-ResNet runs.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambdapipe import atomic
from lambdapipe.errors import UserError

SPLITS = ("train", "val", "test")
STAGES = ("layer4", "layer3")  # the last stage of a ResNet (ImageNet-style, then CIFAR-style)


def _target_layer(model: torch.nn.Module, name: str) -> tuple[str, torch.nn.Module]:
    for stage in STAGES:
        layer = getattr(model, stage, None)
        if isinstance(layer, torch.nn.Module) and any(
                isinstance(m, torch.nn.Conv2d) for m in layer.modules()):
            return stage, layer
    raise UserError(f"cannot explain model {name!r}: it has no convolutional last stage "
                    f"({' or '.join(STAGES)}) for Grad-CAM")


def _lambda_layer(model: torch.nn.Module) -> tuple[str, Any] | None:
    from lambdapipe.models.lambda_layer import LambdaLayer

    for name, module in model.named_modules():
        if isinstance(module, LambdaLayer):
            return name, module
    return None


def _load(ckpt: Path) -> dict[str, Any]:
    from lambdapipe.evaluate import load_checkpoint

    if not ckpt.is_file():
        raise UserError(f"checkpoint {str(ckpt)!r} not found")
    state = load_checkpoint(ckpt, map_location="cpu")
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict) or not {"model", "dataset", "data"} <= set(config) \
            or "model" not in state:
        raise UserError(f"{ckpt} is not a lambdapipe training checkpoint (no run config): "
                        "expected a best.ckpt or last.ckpt written by `lambdapipe train`")
    return state


def explain_checkpoint(ckpt: Path, split: str = "test", images: int = 8,
                       data_dir: Path = Path("data"), out: Path | None = None,
                       device: str = "cpu") -> list[Path]:
    """FullGrad and Grad-CAM maps of the first `images` images of `split`, plus the first
    lambda layer's position embeddings; returns the written paths."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise UserError(f"invalid --images {images!r}: expected an integer >= 1")
    if split not in SPLITS:
        raise UserError(f"invalid --split {split!r}: expected one of {', '.join(SPLITS)}")
    from lambdapipe.evaluate import diverged_before_first_eval

    ckpt = Path(ckpt)
    out = Path(out) if out is not None else ckpt.parent
    if not ckpt.is_file() and diverged_before_first_eval(ckpt.parent):
        # Nothing to explain, and nothing is wrong: say so where the maps would be, so a
        # grid with one such run still completes (the report shows the others).
        path = out / f"explain_{split}.json"
        atomic.write_json(path, {"status": "diverged", "best_ckpt": None, "split": split})
        return [path]
    state = _load(ckpt)
    config = state["config"]

    from pytorch_grad_cam import FullGrad, GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from lambdapipe.augment import normalize
    from lambdapipe.data import load_split
    from lambdapipe.evaluate import build_model, load_weights
    from lambdapipe.feed import eval_split

    model = build_model(config, device)
    load_weights(model, state["model"], str(ckpt))
    stage, target = _target_layer(model, config["model"])
    streamed = eval_split(Path(data_dir), config["dataset"], split, device, 0)  # JPEG index
    data = streamed.split if streamed else load_split(Path(data_dir), config["dataset"], split)
    if images > len(data.labels):
        raise UserError(f"invalid --images {images}: the {split} split of {config['dataset']} "
                        f"has {len(data.labels)} images")
    model.to(device).eval()
    index = np.arange(images)  # fixed: every run of a dataset shows the same images
    raw = (data.batch(index, train=False)[0].permute(0, 2, 3, 1).numpy() if streamed
           else np.ascontiguousarray(data.images[index]))
    mean = torch.tensor(config["data"]["mean"], device=device)
    std = torch.tensor(config["data"]["std"], device=device)
    # NCHW-contiguous: the NHWC arrays permuted would run every conv channels-last, whose
    # 1x1 weight-gradient kernel in oneDNN (torch 2.14 CPU, one thread) writes out of bounds.
    x = normalize(torch.from_numpy(raw).permute(0, 3, 1, 2).contiguous().to(device), mean, std)
    found = _lambda_layer(model)
    seen: list[tuple[int, int]] = []  # the lambda layer's input map, for the position figure
    hook = found[1].register_forward_hook(
        lambda _m, args, _out: seen.append(tuple(args[0].shape[-2:]))) if found else None
    with torch.no_grad():
        logits = model(x)
    if hook is not None:
        hook.remove()
    if not torch.isfinite(logits).all():
        # Nothing to attribute. A lambda layer is quadratic in its input, so while BatchNorm's
        # running statistics still lag (the first tens of steps) eval-mode outputs can overflow;
        # a whole grid must not stop for it: say so where the maps would be.
        path = out / f"explain_{split}.json"
        atomic.write_json(path, {"status": "non-finite", "checkpoint": str(ckpt),
                                 "split": split, "model": config["model"]})
        print(f"warning: {ckpt}: the model's outputs on the {split} images are not finite in "
              "eval mode; no maps written", file=sys.stderr)
        return [path]
    predicted = logits.argmax(1).cpu().numpy()
    targets = [ClassifierOutputTarget(int(c)) for c in predicted]
    # In-place ReLUs would overwrite the activations the backward hooks read.
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    with FullGrad(model=model, target_layers=[]) as cam:
        fullgrad = cam(input_tensor=x, targets=targets)
    with GradCAM(model=model, target_layers=[target]) as cam:
        gradcam = cam(input_tensor=x, targets=targets)

    arrays = {"indices": index, "images": raw, "labels": np.asarray(data.labels)[index],
              "predicted": predicted, "fullgrad": fullgrad.astype(np.float32),
              "gradcam": gradcam.astype(np.float32)}
    position = None
    if found is not None:
        arrays["position"] = found[1].rel_embedding.detach().float().cpu().numpy()
        position = {"layer": found[0],
                    "kind": "lc" if found[1].scope is not None else "rpe",
                    "shape": list(arrays["position"].shape), "axes": "k, u, rows, cols",
                    "feature_map": list(seen[0])}
    for key in ("fullgrad", "gradcam"):
        if not np.isfinite(arrays[key]).all():
            raise UserError(f"{ckpt}: the {key} maps are not finite; the checkpoint's weights "
                            "are probably non-finite (a diverged run)")
    classes = list(data.classes)
    meta = {"checkpoint": str(ckpt), "model": config["model"],
            "model_args": config.get("model_args") or {}, "seed": config.get("seed"),
            "dataset": config["dataset"],
            "split": split, "classes": classes, "indices": index.tolist(),
            "labels": [classes[i] for i in arrays["labels"]],
            "predicted": [classes[i] for i in predicted],
            "gradcam_layer": stage, "fullgrad_layers": "every Conv2d/BatchNorm2d bias",
            "position": position}

    base = out / f"explain_{split}"
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic.write_bytes(base.with_suffix(".npz"), buf.getvalue())
    atomic.write_json(base.with_suffix(".json"), meta)
    written = [base.with_suffix(".npz"), base.with_suffix(".json")]
    written += _figures(base, arrays, meta)
    return written


def _figures(base: Path, arrays: dict[str, np.ndarray], meta: dict) -> list[Path]:
    from lambdapipe.report import figures

    written = figures.save(figures.attention_grid(
        [(meta["model"], arrays)], meta["classes"],
        f"{meta['model']} on {meta['dataset']} {meta['split']}"), base)
    if "position" in arrays:
        fig = figures.position_panels(arrays["position"], meta["position"]["kind"],
                                      f"{meta['model']}, seed {meta['seed']}",
                                      meta["position"]["feature_map"],
                                      meta["position"]["layer"])
        written += figures.save(fig, base.parent / f"{base.name}_position")
    return written
