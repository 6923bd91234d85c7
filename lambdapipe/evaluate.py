"""Evaluation of a model on a split (`predict` + `classification_metrics`: the only
evaluation loop, for training's val and test passes and `lambdapipe evaluate`), and the
checkpoint format: tensors and primitives only, so it loads with
`torch.load(weights_only=True)`, beside a `<name>.sha256` sidecar checked before every load.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lambdapipe import atomic
from lambdapipe.augment import normalize
from lambdapipe.errors import StateError, UserError
from lambdapipe.feed import EvalStream, eval_split
from lambdapipe.runtime import Runtime, impls_of_run, of_run
from lambdapipe.validate import check_model, check_run_config, sidecar_digests

ECE_BINS = 15


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(payload: dict[str, Any], *paths: Path) -> None:
    """Serialise once; write each path so that a kill at ANY moment leaves it verifiable:
    the sidecar first lists the new digest (and the current one), then the checkpoint is
    renamed into place, then the sidecar narrowed to the new digest. Whichever step a crash
    interrupts, the file matches a digest in its sidecar; a damaged file matches none."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    for path in paths:
        path = Path(path)
        current = atomic.sha256_file(path) if path.is_file() else None
        if current != digest:  # also for a first write: a file is never without its digest
            old = f"{current}  {path.name}\n" if current else ""
            atomic.write_text(sidecar(path), f"{digest}  {path.name}\n{old}")
        atomic.write_bytes(path, data)
        atomic.write_text(sidecar(path), f"{digest}  {path.name}\n")


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu",
                    check: bool = True) -> dict[str, Any]:
    """Verify the sha256 sidecar, load with weights_only=True, then (with `check`) validate
    what it holds: an intact file may still hold a config that allocates ~70 GB when built."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist" if not path.exists() else
                        f"refusing checkpoint {path}: not a regular file")
    try:  # bounded, regular files only: a sidecar is input too (lambdapipe/validate.py)
        accepted = sidecar_digests(sidecar(path))
    except FileNotFoundError:
        accepted = []
    if not accepted:
        raise StateError(f"corrupted checkpoint {path}: its sidecar {sidecar(path).name} "
                        "is missing or empty")
    actual = atomic.sha256_file(path)
    if actual not in accepted:
        raise StateError(f"corrupted checkpoint {path}: sha256 {actual[:12]}... does not match "
                        f"{sidecar(path).name} ({accepted[0][:12]}...)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not ours"
        raise StateError(f"{path} is not loadable with torch.load(weights_only=True): "
                        f"{type(exc).__name__}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise StateError(f"{path} is not a lambdapipe checkpoint (no config/model entries)")
    if check:
        try:
            check_checkpoint(ckpt, path)
        except UserError as exc:  # the file, not the command line, is at fault: exit 1
            raise StateError(str(exc)) from None
    return ckpt


def check_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """The embedded config passes `train`'s validators and its model, built on the meta device
    (no memory), has exactly the state dict's names and shapes: only then is anything built
    for real, at the size the file itself proves."""
    config = check_run_config(ckpt["config"], f"checkpoint {path}")
    state = ckpt["model"]
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"checkpoint {path} does not fit its model: its weights are not a "
                        "mapping of names to tensors")
    data = config["data"]
    meta = check_model(config["model"], data["num_classes"], data["image_size"],
                       config["model_args"], copies=1)
    wanted = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))
    if missing or unexpected:
        name, what = (missing[0], "missing") if missing else (unexpected[0], "unexpected")
        raise UserError(f"checkpoint {path} does not fit its model {config['model']}: "
                        f"{what} entry {name!r} ({len(missing)} missing, {len(unexpected)} "
                        "unexpected)")
    for key, shape in wanted.items():
        if have[key] != shape:
            raise UserError(f"checkpoint {path} does not fit its model {config['model']}: "
                            f"{key} has shape {list(have[key])}, the model {list(shape)}")


def build_model(config: dict[str, Any], device: str | torch.device | None = None
                ) -> torch.nn.Module:
    """The registered model a run config names, with the dataset's classes and image size;
    given the `device` it will run on, its lambda impls as `runtime.impls_of_run` says."""
    from lambdapipe.models import create_model

    data = config["data"]
    try:
        model = create_model(config["model"], num_classes=data["num_classes"],
                             image_size=data["image_size"], **config.get("model_args", {}))
    except UserError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot build model {config['model']!r} with args "
                        f"{config.get('model_args', {})}: {msg}") from None
    if device is not None:
        impls_of_run(config, Runtime(str(device)), model)
    return model


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load; a checkpoint of another architecture becomes a one-line UserError."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"checkpoint {where} does not fit its model: {first}") from None


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, mean: torch.Tensor,
            std: torch.Tensor, rt: Runtime, batch_size: int = 500) -> torch.Tensor:
    """float32 logits for uint8 NCHW `images` (already on the model's device), eval mode,
    in `rt`'s precision and layout."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = normalize(images[i:i + batch_size], mean, std, rt.channels_last)
            with rt.autocast():
                out.append(model(x).float())
        return torch.cat(out)
    finally:
        model.train(was_training)


def predict_split(model: torch.nn.Module, data: Any, mean: torch.Tensor, std: torch.Tensor,
                  rt: Runtime) -> torch.Tensor:
    """`predict` of a split held on the device (augment.DeviceImages), or of a streamed one
    (feed.EvalStream) batch by batch: its images are never all in memory, its logits are,
    on the CPU (50,000 x 1000 float32 = 200 MB for ImageNet's val set)."""
    if isinstance(data, EvalStream):
        return torch.cat([predict(model, x, mean, std, rt).cpu() for x in data.batches()])
    return predict(model, data.images, mean, std, rt)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           detailed: bool = False) -> dict[str, Any]:
    """Accuracy, NLL and expected calibration error (15 equal-width confidence bins, Guo et
    al. 2017: ECE = sum_b |B_b|/N |acc(B_b) - conf(B_b)|); with `detailed`, per-class
    accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    logits, labels = logits.detach().float().cpu(), labels.cpu()  # small; CPU math is exact
    n, k = logits.shape
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    bins = torch.clamp((conf.double() * ECE_BINS).ceil().long() - 1, 0, ECE_BINS - 1)
    count = torch.zeros(ECE_BINS, dtype=torch.float64, device=logits.device)
    count.index_add_(0, bins, torch.ones_like(correct))
    gap = torch.zeros_like(count).index_add_(0, bins, correct - conf.double())
    result: dict[str, Any] = {
        "n": n,
        "accuracy": correct.mean().item(),
        "nll": F.cross_entropy(logits.double(), labels).item(),
        "ece": (gap.abs().sum() / n).item(),
    }
    if detailed:
        confusion = torch.zeros(k, k, dtype=torch.int64, device=logits.device)
        confusion.view(-1).index_add_(0, labels * k + pred, torch.ones_like(labels))
        support = confusion.sum(dim=1)
        per_class = confusion.diagonal().double() / support.clamp(min=1)
        result["per_class_accuracy"] = [v if s else None for v, s in
                                        zip(per_class.tolist(), support.tolist(), strict=True)]
        result["confusion_matrix"] = confusion.tolist()
    return result


def diverged_before_first_eval(run: Path) -> bool:
    """A run that diverged before its first evaluation: finished, but with no best.ckpt."""
    try:
        summary = json.loads((Path(run) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(summary, dict) and summary.get("status") == "diverged"
            and summary.get("best_iteration") is None)


def evaluate_checkpoint(ckpt: Path, split: str, data_dir: Path, device: str,
                        out: Path | None) -> dict[str, Any]:
    """`checkpoint_scores` on one split, written to `out`. The missing best.ckpt of a run that
    diverged before its first evaluation gives `status: diverged`, not an error, so one such
    run does not stop a grid."""
    ckpt = Path(ckpt)
    if not ckpt.is_file() and diverged_before_first_eval(ckpt.parent):
        result = {"status": "diverged", "best_ckpt": None, "checkpoint": str(ckpt),
                  "split": split}
    else:
        result = checkpoint_scores(ckpt, [split], data_dir, device)[split]
    if out is not None:
        atomic.write_json(out, result)
    return result


def checkpoint_scores(ckpt: Path, splits: list[str], data_dir: Path, device: str
                      ) -> dict[str, dict[str, Any]]:
    """Metrics of a training checkpoint on each of `splits`, its model built and loaded once;
    train is scored against its clean labels (`accuracy`) and the run's noisy labels
    (`label_accuracy`)."""
    from lambdapipe.augment import DeviceImages
    from lambdapipe.data import load_split

    state = load_checkpoint(ckpt, map_location="cpu")
    config = state["config"]
    model = build_model(config)
    rt = of_run(config, device, model)  # as the run's recipe runs on this device
    load_weights(model, state["model"], str(ckpt))
    model.to(device)
    mean, std = (torch.tensor(config["data"][k], device=device) for k in ("mean", "std"))
    results = {}
    for split in splits:
        noise = config["noise"] if split == "train" else "clean"
        images = eval_split(Path(data_dir), config["dataset"], split, device)  # a JPEG index
        data = images.split if images is not None else load_split(
            Path(data_dir), config["dataset"], split, noise=noise)
        h = data.size if images is not None else data.images.shape[1]
        if data.num_classes != config["data"]["num_classes"] or \
                h != config["data"]["image_size"]:
            raise UserError(f"checkpoint {ckpt} was trained on {config['data']['num_classes']} "
                            f"classes at {config['data']['image_size']} px, but "
                            f"{config['dataset']} {split} in {data_dir} has {data.num_classes} "
                            f"classes at {h} px")
        if images is None:
            images = DeviceImages(data.images, data.labels, data.clean_labels, device)
        logits = predict_split(model, images, mean, std, rt)
        results[split] = result = {
            "status": "ok", "checkpoint": str(ckpt), "iteration": state.get("iteration"),
            "model": config["model"], "dataset": config["dataset"], "split": split,
            "noise": noise, "classes": list(data.classes),
            **classification_metrics(logits, images.clean_labels, detailed=True)}
        if split == "train" and noise != "clean":
            result["label_accuracy"] = classification_metrics(logits, images.labels)["accuracy"]
    return results


def format_result(result: dict[str, Any]) -> str:
    if result.get("status") == "diverged":
        return (f"{result['checkpoint']}: no checkpoint to evaluate, the run diverged before "
                "its first evaluation")
    lines = [f"{result['model']} on {result['dataset']} {result['split']} "
             f"(n={result['n']}, checkpoint iteration {result['iteration']}):",
             f"  accuracy {result['accuracy']:.4f}   nll {result['nll']:.4f}   "
             f"ece {result['ece']:.4f}"]
    if "label_accuracy" in result:
        lines.append(f"  accuracy on the noisy labels ({result['noise']}) "
                     f"{result['label_accuracy']:.4f}")
    width = max(len(str(c)) for c in result["classes"])
    for name, acc in zip(result["classes"], result["per_class_accuracy"], strict=True):
        shown = "   n/a" if acc is None else f"{acc:.4f}"
        lines.append(f"  {str(name):<{width}}  {shown}")
    return "\n".join(lines)
