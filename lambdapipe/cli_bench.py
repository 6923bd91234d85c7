"""`lambdapipe bench`: its options and their checks (cli.py registers it)."""

from __future__ import annotations

from pathlib import Path

import click

from lambdapipe.cli_options import (
    DATASET_CHOICE,
    data_dir_option,
    device_option,
    gpu_lock_dir_option,
    int_list,
    parse_key_values,
    user_errors,
)
from lambdapipe.errors import UserError
from lambdapipe.recipes import COMPILE_MODES, PRECISIONS, STEP_GRAPH, get_recipe


@click.command()
@click.option("--models", "model_names", default=None,
              help="Comma-separated model names [default: resnet18,resnet20x1,lr18_l3_lc,"
                   "lr18_l2_lc].")
@click.option("--config", "configfiles", type=click.Path(dir_okay=False, path_type=Path),
              multiple=True,
              help="Project this workflow config's wall time instead: every distinct "
                   "model x recipe of it is measured with its own recipe, batch size and "
                   "precision (repeat to merge files as snakemake --configfile A B does); "
                   "--compile MODE then applies to every cell.")
@click.option("--datasets", default=None, help="With --config: only these datasets (comma-"
                                               "separated).")
@click.option("--seeds", default=None, help="With --config: only these seeds (comma-separated).")
@click.option("--slots", default="1", show_default=True,
              help="Runs sharing the GPU at once (as LAMBDAPIPE_GPU_SLOTS); with --config a "
                   "comma-separated list to compare, e.g. 1,2.")
@click.option("--pack", type=int, default=1, show_default=True,
              help="Also time this many runs stepping together in one process (as `train "
                   "--seeds` does), beside one run; with --config, project the grid with each "
                   "cell's seeds packed, up to this many to a process.")
@click.option("--fuse/--no-fuse", default=False,
              help="With --pack: the packed runs as one network (`train --fuse`).")
@click.option("--impls", is_flag=True, default=False,
              help="Instead: time every implementation of each lambda layer of --models, "
                   "forward + backward alone; `*` marks the one `auto` runs on this device.")
@click.option("--gpus", type=int, default=1, show_default=True,
              help="With --config: GPUs the grid is spread over (a run of "
                   "train.gpus x train.nodes ranks holds that many at once).")
@click.option("--dataset", type=DATASET_CHOICE, default="cifar10", show_default=True,
              help="Sets classes and image size; synthetic data unless --real-data.")
@data_dir_option
@click.option("--real-data/--synthetic", default=False,
              help="Also time the step on the prepared dataset (needs `prepare`).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="bf16", show_default=True)
@click.option("--compile", "compile_", default="auto", show_default=True,
              type=click.Choice(["auto", "false", "true", *COMPILE_MODES, STEP_GRAPH]),
              help="The recipe field's values (`--set compile=...`): auto is what training "
                   "runs (CUDA graphs on a GPU, eager on a CPU); false: eager; true: "
                   "torch.compile's default mode; reduce-overhead: + CUDA graphs; "
                   "step-graph: the whole step as one CUDA graph.")
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE")
@device_option()
@gpu_lock_dir_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON.")
@user_errors
def bench(model_names: str | None, configfiles: tuple[Path, ...], datasets: str | None,
          seeds: str | None, slots: str, pack: int, fuse: bool, impls: bool,
          gpus: int, dataset: str, data_dir: Path, real_data: bool, batch_size: int,
          precision: str, compile_: str, warmup: int, steps: int, model_args: tuple[str, ...],
          device: str, gpu_lock_dir: Path | None, out: Path | None) -> None:
    """Time the whole training step: iter/min, images/s, peak memory, MFU, ratio to
    ResNet-18, start-up, evaluation and checkpoint costs; or, with --config, project a
    config's wall time on this device from those measurements.

    \b
    Examples:
      lambdapipe bench --models resnet18,lr18_l3_lc --batch-size 256 --precision bf16
      lambdapipe bench --config config/resnet_baselines.yaml --datasets cifar10 --slots 1,2
      lambdapipe bench --models resnet20x1 --pack 4 --compile reduce-overhead
      lambdapipe bench --models resnet20x1 --pack 4 --fuse
    """
    from lambdapipe import bench as benchmark
    from lambdapipe import bench_table, gpu

    slot_counts = int_list(slots, "--slots", minimum=1, example="1,2")
    if pack < 1:
        raise UserError(f"invalid --pack {pack!r}: expected an integer >= 1")
    if pack > 1 and slot_counts != [1]:
        raise UserError(f"--pack {pack} and --slots {slots} exclude each other: runs share "
                        "the GPU either in one process (--pack) or in several (--slots)")
    if fuse and pack < 2:
        raise UserError("--fuse times packed runs as one network: give --pack 2 or more")
    if impls and (configfiles or pack > 1 or slot_counts != [1]):
        raise UserError("--impls times each lambda layer of --models alone: drop --config, "
                        "--pack and --slots")
    compile_mode: bool | str = {"false": False, "true": "default"}.get(compile_, compile_)
    if configfiles:
        if model_names is not None or model_args:
            raise UserError("--config takes models and model args from the config: drop "
                            "--models and --model-arg")
        # auto: each cell as its recipe says; off or a mode: every cell so
        _bench_config(configfiles, datasets, seeds, slot_counts, gpus,
                      None if compile_ == "auto" else compile_mode,
                      data_dir, real_data, warmup, steps, device, gpu_lock_dir, out, pack,
                      fuse)
        return
    if len(slot_counts) != 1:
        raise UserError(f"invalid --slots {slots!r}: one count without --config")
    names = [m.strip() for m in (model_names or "resnet18,resnet20x1,lr18_l3_lc,lr18_l2_lc")
             .split(",") if m.strip()]
    benchmark.check_args(names, batch_size, precision, warmup, steps, slot_counts[0])
    parsed_args = parse_key_values(model_args, "--model-arg")
    if impls:
        recipe = get_recipe("sgdm", {"batch_size": batch_size, "precision": precision})
        with gpu.claim(device, lock_dir=gpu_lock_dir) as dev:
            rows = benchmark.time_impls(names, recipe, dev, dataset, parsed_args,
                                        min(warmup, 5), min(steps, 20))
        click.echo(bench_table.format_impl_rows(rows))
        if out is not None:
            bench_table.write_rows(rows, out)
        return
    done: list[dict] = []

    def on_row(row: dict) -> None:  # printed and saved as measured: a kill loses no row
        done.append(row)
        click.echo(bench_table.format_row(row))
        if out is not None:
            bench_table.write_rows(done, out)

    with gpu.claim(device, lock_dir=gpu_lock_dir) as dev:  # timings need the GPU to itself
        click.echo(bench_table.HEAD + "\n" + "-" * len(bench_table.HEAD))
        rows = benchmark.run(names, dataset=dataset, data_dir=data_dir, real_data=real_data,
                             batch_size=batch_size, precision=precision, compile=compile_mode,
                             warmup=warmup, steps=steps, model_args=parsed_args,
                             device=dev, slots=slot_counts[0], pack=pack, fuse=fuse,
                             on_row=on_row)
    if len(rows) > 1:  # ratios to rows measured later: the whole table once more
        click.echo(bench_table.format_rows(rows))
    else:
        click.echo(bench_table.format_rows(rows, head=False))
    if out is not None:
        bench_table.write_rows(rows, out)


def _bench_config(configfiles: tuple[Path, ...], datasets: str | None, seeds: str | None,
                  slots: list[int], gpus: int, compile_mode: bool | str | None, data_dir: Path,
                  real_data: bool, warmup: int, steps: int, device: str,
                  gpu_lock_dir: Path | None, out: Path | None, pack: int = 1,
                  fuse: bool = False) -> None:
    """`bench --config`: every argument checked before the GPU is claimed."""
    from lambdapipe import bench_table, project
    from lambdapipe.config import load_configs

    cfg = load_configs(configfiles)
    named = " ".join(str(p) for p in configfiles)
    wanted = [d.strip() for d in datasets.split(",")] if datasets else None
    for d in wanted or []:
        if d not in cfg["datasets"]:
            raise UserError(f"invalid --datasets {d!r}: expected datasets of {named}: "
                            + ", ".join(cfg["datasets"]))
    seed_list = int_list(seeds, "--seeds", minimum=0, example="0,1") if seeds else None
    if gpus < 1:
        raise UserError(f"invalid --gpus {gpus!r}: expected an integer >= 1")
    # project checks the rest, then claims the GPU: one, or one by each rank of a DDP run
    result = project.project(cfg, datasets=wanted, seeds=seed_list, slots=slots, gpus=gpus,
                             device=device, warmup=warmup, steps=steps, data_dir=data_dir,
                             real_data=real_data, compile=compile_mode, pack=pack, fuse=fuse,
                             progress=lambda m: click.echo(m, err=True), lock_dir=gpu_lock_dir)
    click.echo(project.format_projection(result))
    if out is not None:
        bench_table.write_rows(result.pop("rows"), out, config=named, **result)
