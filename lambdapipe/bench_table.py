"""`lambdapipe bench`'s rows (and `bench --impls`') as a plain-text table and as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lambdapipe import atomic


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEAD = (f"{'model':<22} {'params(M)':>9} {'iter/min':>9} {'img/s':>9} {'step ms':>8} "
        f"{'peak GiB':>8} {'TFLOP/s':>8} {'MFU':>6} {'vs r18':>6} {'vs base':>7} "
        f"{'mem x':>5} {'start s':>7} {'eval img/s':>10} {'ckpt s':>6}  path")


def format_row(r: dict[str, Any]) -> str:
    model = r["model"] + (f" x{r['pack']}" if r.get("pack", 1) > 1 else "") \
        + (" fused" if r.get("fused") else "")
    return (f"{model:<22} {r['params'] / 1e6:>9.2f} {r['iter_per_min']:>9.0f} "
            f"{r['images_per_s']:>9.0f} {r['step_ms']:>8.2f} {_fmt(r['peak_mem_gib'], '8.2f'):>8} "
            f"{_fmt(r['model_tflops_per_s'], '8.1f'):>8} {_fmt(r['mfu'], '6.1%'):>6} "
            f"{_fmt(r.get('vs_resnet18'), '6.2f'):>6} {_fmt(r.get('vs_resnet'), '7.2f'):>7} "
            f"{_fmt(r.get('mem_vs_resnet'), '5.2f'):>5} {r['startup_s']:>7.1f} "
            f"{r['eval_images_per_s']:>10.0f} {r['ckpt_s']:>6.2f}  {r.get('path', '-')}")


def format_rows(rows: list[dict[str, Any]], head: bool = True) -> str:
    """A plain-text table, one line per model (`head=False`: the closing line only)."""
    lines = [HEAD, "-" * len(HEAD)] + [format_row(r) for r in rows] if head else []
    if rows:
        r = rows[0]
        slots = (f", {r['slots']} processes at once (rates and memory summed)"
                 if r["slots"] > 1 else "")
        packs = [x for x in rows if x.get("pack", 1) > 1]
        if packs:
            slots += (f"; 'x{packs[0]['pack']}': that many runs in one process "
                      "(rates and memory summed), " + ", ".join(
                          f"{x['model']} {x['vs_one_run']:.2f}x one run" for x in packs))
        lines.append(f"({r['device_name']}, {r['precision']}, batch {r['batch_size']}, "
                     f"{'tf32, ' if r.get('tf32') else ''}"
                     f"{'real' if r['real_data'] else 'synthetic'} {r['dataset']} data, "
                     f"{r['steps']} timed steps after {r['warmup']} warm-up{slots})")
    return "\n".join(lines)


def format_impl_rows(rows: list[dict[str, Any]]) -> str:
    """`bench --impls`: one line per layer and implementation, `*` on the rule's pick."""
    head = f"{'model':<16} {'layer':<20} {'map':>7} {'impl':<7} {'ms':>8}  rule"
    lines = [head, "-" * len(head)] + [
        f"{r['model']:<16} {r['layer']:<20} {r['map']:>7} {r['impl']:<7} {r['ms']:>8.2f}  "
        + ("*" if r["impl"] == r["rule"] else "") for r in rows]
    if rows:
        r = rows[0]
        lines.append(f"(forward + backward of one layer, {r['device']}, {r['precision']}, "
                     f"batch {r['batch_size']}{', channels_last' if r['channels_last'] else ''})")
    return "\n".join(lines)


def write_rows(rows: list[dict[str, Any]], path: Path, **extra: Any) -> None:
    import datetime

    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    atomic.write_json(path, {"torch": torch.__version__, "date": when, **extra, "rows": rows})
