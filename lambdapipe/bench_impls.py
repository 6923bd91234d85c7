"""`lambdapipe bench --impls`: every implementation of each lambda layer timed, the check
of the fixed rule `auto` follows (models/lambda_layer.py, docs/performance.md)."""

from __future__ import annotations

import time
from typing import Any

import torch

from lambdapipe.bench import release, timed
from lambdapipe.recipes import Recipe
from lambdapipe.runtime import resolve


def time_impls(names: list[str], recipe: Recipe, device: str = "cpu", dataset: str = "cifar10",
               model_args: dict[str, Any] | None = None, warmup: int = 2,
               steps: int = 5) -> list[dict[str, Any]]:
    """Forward + backward of each lambda layer alone, in every implementation that fits
    (`candidate_impls`), at the recipe's batch, precision and layout."""
    from lambdapipe.data import dataset_info
    from lambdapipe.models import create_model
    from lambdapipe.models.lambda_layer import lambda_layers, map_sizes

    rt, info, rows = resolve(recipe, device), dataset_info(dataset), []
    for name in names:
        model = create_model(name, num_classes=info.num_classes, image_size=info.image_size,
                             **(model_args or {}))
        sizes = map_sizes(model, info.image_size)
        for layer_name, layer in lambda_layers(model):
            (h, w), layer = sizes[layer_name], layer.to(device)
            x = torch.randn(recipe.batch_size, layer.to_queries[0].in_channels, h, w,
                            device=device)
            if rt.channels_last:
                x, layer = (t.to(memory_format=torch.channels_last) for t in (x, layer))
            x.requires_grad_(True)
            for impl in layer.candidate_impls(h, w):
                layer.impl = impl

                def once(_i: int, layer=layer, x=x) -> None:
                    with rt.autocast():
                        out = layer(x)
                    out.float().sum().backward()
                    layer.zero_grad(set_to_none=True)

                _, seconds = timed(once, warmup, steps, device, time.perf_counter())
                rows.append({"model": name, "layer": layer_name, "map": f"{h}x{w}",
                             "impl": impl, "ms": 1000 * seconds / steps,
                             "rule": layer.rule_impl(h, w, device),
                             "batch_size": recipe.batch_size, "precision": rt.precision,
                             "channels_last": rt.channels_last, "device": str(device)})
            release(device)
    return rows


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
