"""`lambdapipe <verb>`: the one face that wires data, models, training and reporting.

Heavy modules (torch, pandas) are imported inside the commands so `--help` stays instant.
Exit codes as click uses them: 2 with the usage line for bad command-line input (click's own
checks, or a library `UserError`); 1 with one `Error:` line and no usage block for anything
else that fails (a `StateError`: corrupt checkpoint, dataset not prepared, run directory
busy, network down; a failed write).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from lambdapipe.cli_bench import bench
from lambdapipe.cli_options import (
    DATASET_CHOICE,
    RegistryChoice,
    data_dir_option,
    dataset_option,
    device_option,
    gpu_lock_dir_option,
    int_list,
    mirror_option,
    parse_key_values,
    recipe_names,
    user_errors,
    with_noise_options,
)
from lambdapipe.errors import UserError, bad_value
from lambdapipe.launch import MASTER_PORT  # stdlib only: `--help` stays instant


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lambdapipe")
def main() -> None:
    """Reproducible LambdaNetworks vs ResNet experiments on small, noisy-label datasets.

    \b
    Example:
      lambdapipe prepare --dataset digits --noise 0.25
      lambdapipe train --model resnet20x1 --dataset digits --noise 0.25 --out runs/r20
    """


# --------------------------------------------------------------------------- models
@main.command()
@click.option("--dataset", type=DATASET_CHOICE, default="cifar10", show_default=True,
              help="Dataset whose classes and image size the counts are for.")
@click.option("--pattern", default="*", show_default=True, help="Glob on model names.")
@user_errors
def models(dataset: str, pattern: str) -> None:
    """List every registered model with its parameter count for DATASET.

    \b
    Example:
      lambdapipe models --dataset cifar100 --pattern 'lr18*'
    """
    from lambdapipe.data import dataset_info
    from lambdapipe.models import list_models, param_count

    info = dataset_info(dataset)
    names = list_models(pattern)
    if not names:
        raise UserError(f"no model matches pattern {pattern!r}: try `lambdapipe models`")
    click.echo(f"{'model':<28} {'params':>12} {'params (M)':>10}   "
               f"({dataset}: {info.num_classes} classes, {info.image_size} px)")
    for name in names:
        n = param_count(name, num_classes=info.num_classes, image_size=info.image_size)
        click.echo(f"{name:<28} {n:>12,} {n / 1e6:>10.2f}")


# --------------------------------------------------------------------------- data
@main.command()
@dataset_option
@data_dir_option
@mirror_option
@click.option("--url", default=None, help="Override the official URL (e.g. an internal server).")
@user_errors
def download(dataset: str, data_dir: Path, mirror: Path | None, url: str | None) -> None:
    """Fetch DATASET's official archive into DATA_DIR/raw (mirror first, md5-checked).

    \b
    Example:
      lambdapipe download --dataset cifar10 --mirror /shared/archives
    """
    from lambdapipe.data import download as do_download

    path = do_download(dataset, data_dir / "raw", mirror=mirror, url=url)
    click.echo(f"archive: {path}")


@main.command()
@dataset_option
@data_dir_option
@mirror_option
@with_noise_options
@click.option("--val-fraction", type=float, default=None,
              help="Share of the official training set held out as val (default 0.1).")
@click.option("--val-size", type=int, default=None,
              help="Exact number of val images instead of a fraction (e.g. 5000).")
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=int, default=None,
              help="Resize to this many pixels (datasets with a configurable size).")
@user_errors
def prepare(dataset: str, data_dir: Path, mirror: Path | None, noise_rate: float,
            noise_kind: str, noise_seed: int, val_fraction: float | None,
            val_size: int | None, split_seed: int, image_size: int | None) -> None:
    """Turn DATASET's archive into verified arrays, and write a noisy-label variant.

    \b
    Example:
      lambdapipe prepare --dataset cifar10 --noise 0.25 --noise-kind symmetric
    """
    from lambdapipe import data
    from lambdapipe.noise import max_rate

    spec = data.noise_spec(noise_kind, noise_rate, noise_seed)
    info = data.dataset_info(dataset)
    top = max_rate(spec.kind, info.num_classes, info.classes)
    if spec.rate > top:  # refused before the archive is read, not after the arrays exist
        raise bad_value(f"{spec.kind} noise rate for {dataset}", spec.rate,
                        f"at most {top:g} (only classes with a partner can flip)")
    prepared = data.prepare(dataset, data_dir, mirror=mirror, val_fraction=val_fraction,
                            val_size=val_size, split_seed=split_seed, image_size=image_size)
    variant = data.make_noise(prepared, spec)
    for line in data.describe(prepared, spec):
        click.echo(line)
    click.echo(f"noise variant: {variant}")


# --------------------------------------------------------------------------- training
@main.command()
@click.option("--model", required=True, help="Registered model name (`lambdapipe models`).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Model hyperparameter, e.g. k=8, r=15, base_width=16 (repeatable).")
@dataset_option
@data_dir_option
@with_noise_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seeds", default=None, metavar="0,1,2",
              help="Train these seeds together in one process (instead of --seed); --out "
                   "is then a template holding {seed}.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory (resumed if it holds an interrupted run of this config); "
                   "{seed} in it is replaced by the seed.")
@click.option("--recipe", type=RegistryChoice(recipe_names), default="sgdm",
              show_default=True, help="Named recipe (lambdapipe/recipes.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. lr=0.05 iterations=2000 precision=bf16.")
@device_option()
@gpu_lock_dir_option
@click.option("--deterministic/--no-deterministic", default=False,
              help="Bit-reproducible kernels (slower); resume then equals an unbroken run.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: only on a terminal).")
@click.option("--fuse/--no-fuse", default=None,
              help="With --seeds (default: fuse): train the seeds as one network (their "
                   "models stacked, one set of kernels) where they can (not fp16), else one "
                   "after another. A fused seed equals the seed alone statistically, not "
                   "numerically: float sums in another order, so final accuracies differ about "
                   "as seeds do (docs/performance.md). --no-fuse: one after another, each "
                   "bitwise as trained alone.")
@user_errors
@click.pass_context
def train(ctx: click.Context, model: str, model_args: tuple[str, ...], dataset: str,
          data_dir: Path, noise_rate: float, noise_kind: str, noise_seed: int, seed: int,
          seeds: str | None, out: Path, recipe: str, overrides: tuple[str, ...], device: str,
          gpu_lock_dir: Path | None, deterministic: bool, progress: bool | None,
          fuse: bool | None) -> None:
    """Train MODEL on DATASET (with label noise) and write a run directory to OUT.

    \b
    Example:
      lambdapipe train --model lr18_l3_lc --dataset cifar10 --noise 0.25 --seed 0 \\
          --out results/runs/cifar10/symmetric-0.25/lr18_l3_lc/0
    The three seeds of a grid cell in one process, as one network (--no-fuse: one after
    another):
      lambdapipe train --model resnet20x1 --dataset cifar10 --seeds 0,1,2 \\
          --out 'results/runs/cifar10/clean/resnet20x1/{seed}'
    """
    from lambdapipe import data, distributed, gpu, logs, runlock
    from lambdapipe import train as training

    seed_list = _seed_list(ctx, seed, seeds, out)
    if fuse is None:
        fuse = len(seed_list) > 1
    if fuse and len(seed_list) < 2:
        raise UserError("--fuse trains several seeds as one network: give --seeds with two or "
                        "more seeds, e.g. --seeds 0,1,2")
    parsed_args = parse_key_values(model_args, "--model-arg")
    parsed_set = parse_key_values(overrides, "--set")
    noise = data.noise_spec(noise_kind, noise_rate, noise_seed).tag
    cfgs = [training.TrainConfig.build(
        model=model, model_args=parsed_args, dataset=dataset, data_dir=data_dir, noise=noise,
        seed=s, out=Path(str(out).replace("{seed}", str(s))), recipe=recipe,
        overrides=parsed_set, deterministic=deterministic,
    ) for s in seed_list]
    if progress is None:
        progress = sys.stderr.isatty()
    world = distributed.from_env()  # torchrun's or srun's ranks (docs/distributed.md)
    if world.size > 1:
        r = cfgs[0].recipe
        distributed.check(world, r.batch_size, r.drop_last, r.compile, len(cfgs))
        if not world.lead:  # one rank speaks: rank 0 (warnings and errors still show)
            logs.configure("warning")
        with gpu.claim(distributed.rank_device(world, device), lock_dir=gpu_lock_dir) as dev, \
                distributed.joined(world, dev):  # rank 0 checks and owns --out
            summaries = [training.run(cfgs[0], device=dev, progress=progress and world.lead)]
        if not world.lead:
            return
    elif len(cfgs) == 1:
        training.check_before_start(cfgs[0])  # bad input fails here, before anything is written
        # --out's owner before a GPU: a second command on the same --out refuses without one.
        with runlock.own(cfgs[0].out), gpu.claim(device, lock_dir=gpu_lock_dir) as dev:
            summaries = [training.run(cfgs[0], device=dev, progress=progress)]
    else:
        from lambdapipe import pack

        pack.check_packed(cfgs)  # every seed's checks, before any GPU is claimed
        with pack.own_all(cfgs), gpu.claim(device, lock_dir=gpu_lock_dir) as dev:
            summaries = pack.run_packed(cfgs, device=dev, progress=progress, fuse=fuse)

    for cfg, summary in zip(cfgs, summaries, strict=True):
        def shown(key: str, summary=summary) -> str:  # None: diverged before any evaluation
            return "n/a" if summary[key] is None else f"{summary[key]:.4f}"

        at = f" at iteration {summary['diverged_at']}" if summary["status"] == "diverged" else ""
        click.echo(f"{summary['status']}{at}: val_acc={shown('val_acc')} "
                   f"tst_acc={shown('tst_acc')} -> {cfg.out / 'summary.json'}")


def _seed_list(ctx: click.Context, seed: int, seeds: str | None, out: Path) -> list[int]:
    """`--seed N` or `--seeds 0,1,2`; several seeds need an --out template with {seed}."""
    if seeds is None:
        return [seed]
    if ctx.get_parameter_source("seed") is click.core.ParameterSource.COMMANDLINE:
        raise UserError("--seed and --seeds exclude each other: give one")
    seed_list = int_list(seeds, "--seeds", minimum=0, example="0,1,2")
    if len(set(seed_list)) < len(seed_list):
        raise UserError(f"invalid --seeds {seeds!r}: a seed is repeated")
    if len(seed_list) > 1 and "{seed}" not in str(out):
        raise UserError(f"invalid --out {str(out)!r} for {len(seed_list)} seeds: expected a "
                        "template holding {seed}, e.g. 'results/runs/cifar10/clean/resnet20x1/"
                        "{seed}'")
    return seed_list


@main.command(context_settings={"ignore_unknown_options": True,
                                "allow_interspersed_args": False})
@click.option("--gpus", type=int, default=1, show_default=True, help="Ranks (GPUs) per node.")
@click.option("--nodes", type=int, default=1, show_default=True,
              help="Nodes: under SLURM, or by hand with --node-rank and --master-addr.")
@click.option("--node-rank", type=int, default=None,
              help="Outside SLURM: this machine's node, 0 .. NODES-1 (0 on --master-addr).")
@click.option("--master-addr", default=None, help="Outside SLURM: node 0's host name.")
@click.option("--master-port", type=int, default=MASTER_PORT, show_default=True,
              help="Outside SLURM: a free port on node 0.")
@click.argument("args", nargs=-1, required=True, type=click.UNPROCESSED)
@user_errors
def launch(gpus: int, nodes: int, node_rank: int | None, master_addr: str | None,
           master_port: int, args: tuple[str, ...]) -> None:
    """Run `lambdapipe ARGS` as GPUS ranks on each of NODES nodes: torchrun on this machine
    (or, with --node-rank and --master-addr, on each of several machines), srun inside a SLURM
    job (what a workflow job of `train: {gpus, nodes}` runs).

    \b
    Example:
      lambdapipe launch --gpus 4 train --model resnet50 --dataset imagenet32 ...
      lambdapipe launch --gpus 8 --nodes 2 --node-rank 0 --master-addr node0 train ...
    """
    from lambdapipe.launch import command

    argv, env = command(gpus, nodes, args, node_rank=node_rank, master_addr=master_addr,
                        master_port=master_port)
    rendezvous = " ".join(f"{k}={env[k]}" for k in ("MASTER_ADDR", "MASTER_PORT")
                          if env.get(k) != os.environ.get(k))
    click.echo(f"lambdapipe launch: {rendezvous} {' '.join(argv)}".replace("  ", " "), err=True)
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)


@main.command()
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Checkpoint written by `lambdapipe train`.")
@click.option("--split", type=click.Choice(["train", "val", "test", "test_v2"]),
              default="test", show_default=True, help="test_v2: ImageNet-V2 (imagenet2012).")
@data_dir_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON file to write (default: eval_<split>.json beside the checkpoint).")
@device_option()
@gpu_lock_dir_option
@user_errors
def evaluate(ckpt: Path, split: str, data_dir: Path, out: Path | None, device: str,
             gpu_lock_dir: Path | None) -> None:
    """Accuracy, NLL, ECE, per-class accuracy and confusion matrix of CKPT on SPLIT.

    \b
    Example:
      lambdapipe evaluate --ckpt results/runs/digits/clean/resnet20x1/0/best.ckpt
    """
    from lambdapipe import gpu
    from lambdapipe.evaluate import evaluate_checkpoint, format_result

    out = out or ckpt.parent / f"eval_{split}.json"
    with gpu.claim(device, lock_dir=gpu_lock_dir) as dev:
        result = evaluate_checkpoint(ckpt, split=split, data_dir=data_dir, device=dev, out=out)
    click.echo(format_result(result))
    click.echo(f"wrote {out}")


@main.command()
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Checkpoint written by `lambdapipe train` (best.ckpt).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test",
              show_default=True)
@click.option("--images", type=int, default=8, show_default=True,
              help="Explain the first this many images of the split (the same for every run).")
@data_dir_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory to write into (default: beside the checkpoint).")
@device_option()
@gpu_lock_dir_option
@user_errors
def explain(ckpt: Path, split: str, images: int, data_dir: Path, out: Path | None,
            device: str, gpu_lock_dir: Path | None) -> None:
    """FullGrad and Grad-CAM maps of CKPT's predictions, and its lambda layer's learned
    position embeddings: explain_<split>.{npz,json,png,svg} (+ _position.{png,svg}).

    \b
    Example:
      lambdapipe explain --ckpt results/runs/digits/clean/lr18_l3_lc/0/best.ckpt --images 8
    """
    from lambdapipe import gpu
    from lambdapipe.explain import explain_checkpoint

    with gpu.claim(device, lock_dir=gpu_lock_dir) as dev:
        written = explain_checkpoint(ckpt, split=split, images=images, data_dir=data_dir,
                                     out=out, device=dev)
    for path in written:
        click.echo(f"wrote {path}")


main.add_command(bench)


# --------------------------------------------------------------------------- reporting
@main.command()
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results/runs"), show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True,
              help="Writes OUT/tables/*.{md,csv}, OUT/figures/*.png, OUT/figures-svg/*.svg.")
@click.option("--published", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of published reference CSVs (default: the shipped copies).")
@click.option("--published-as", "published_as", multiple=True, metavar="STANDIN=SOURCE",
              help="Read a stand-in dataset's runs against SOURCE's published rows, e.g. "
                   "digits=cifar10 (repeatable; the workflow passes config report.published_as).")
@click.argument("current", nargs=-1, type=click.Path(path_type=Path))
@user_errors
def report(runs: Path, out: Path, published: Path | None, published_as: tuple[str, ...],
           current: tuple[Path, ...]) -> None:
    """Tables (ours beside the published values) and figures from finished run directories.

    \b
    Example:
      lambdapipe report --runs results/runs --out results

    CURRENT (optional): the summary.json files of the runs a config asks for (the workflow
    passes them); every other run directory under RUNS is named as not the config's.
    """
    from lambdapipe.report import build_report

    pairs = {}
    for item in published_as:
        standin, eq, source = item.partition("=")
        if not eq or not standin or not source:
            raise UserError(f"invalid --published-as {item!r}: expected STANDIN=SOURCE, "
                            "e.g. digits=cifar10")
        pairs[standin] = source
    ids = {Path(os.path.relpath(p.parent, runs)).as_posix() for p in current} or None
    written = build_report(runs, out, published=published, published_as=pairs, current=ids)
    for path in written:
        click.echo(f"wrote {path}")
    for note in [*written.notes, *written.checks]:
        click.echo(note)


# --------------------------------------------------------------------------- workflow
@main.command("check-config")
@click.option("--configfile", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("config/config.yaml"), show_default=True,
              help="Workflow config to validate (the same check the Snakefile runs).")
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results/runs"), show_default=True,
              help="Run directories to hold against the config (skipped if absent).")
@data_dir_option
@user_errors
def check_config(configfile: Path, runs: Path, data_dir: Path) -> None:
    """Validate a workflow config and count its runs, before Snakemake builds the DAG; name
    every run directory under RUNS whose config.json disagrees with the config.

    \b
    Example:
      lambdapipe check-config --configfile config/demo.yaml
    """
    from collections import Counter

    from lambdapipe.config import expand_runs, load_config, stale_prepared
    from lambdapipe.provenance import audit

    cfg = load_config(configfile)
    grid = expand_runs(cfg)
    for dataset, n in Counter(r.dataset for r in grid).items():
        click.echo(f"{dataset}: {n} runs")
    click.echo(f"{configfile}: ok, {len(grid)} runs")
    for line in [*stale_prepared(cfg, data_dir), *audit(grid, runs)]:
        click.echo(line)


if __name__ == "__main__":  # pragma: no cover
    main()
