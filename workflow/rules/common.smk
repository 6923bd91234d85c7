# The workflow's only Python: the run list from the config grid, wildcard constraints and
# input/params functions. Validation and the grid's expansion live in lambdapipe.config, so
# `lambdapipe check-config` and this file can never disagree.
#
# Inputs that jobs upstream make are ancient(): a job reruns when its output is missing, when
# a job upstream of it runs in the same invocation, or when its code, params or input set
# changed (Snakemake's metadata) - never for timestamps alone, which a `dvc pull` or a copy
# scrambles (a fresh clone must not retrain, re-evaluate or re-report what it pulled).
#
# A run's directory is its identity: `<model>-<fingerprint>` names every setting that changes
# its result (model args, the resolved recipe; lambdapipe/provenance.py). A changed setting is
# a new, missing directory, trained in any clone - Snakemake's metadata, which a clone that
# pulled its results lacks, is never what decides a retraining - and an unchanged config
# names the same directories, so nothing reruns.

import re
import shlex
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import DeploymentMethod

from lambdapipe.config import (
    expand_runs,
    pack_cells,
    prepare_args,
    published_as_args,
    run_args,
    stale_prepared,
)
from lambdapipe.data.registry import dataset_info
from lambdapipe.noise import parse_noise_tag
from lambdapipe.slurm import task_resources


def lambdapipe_function():
    """`lambdapipe` in every shell command is this shell function, not the console script of
    whichever checkout the environment installed: this checkout's package (the one the
    Snakefile imported) first on the path, run by Snakemake's own interpreter, or under
    --software-deployment-method conda by the job's env, which holds the dependencies only."""
    with_conda = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    python = "python" if with_conda else shlex.quote(sys.executable)
    path = shlex.quote(str(CHECKOUT))
    # Braces doubled twice: once for this f-string, once for Snakemake's formatting.
    return (
        f'lambdapipe() {{{{ PYTHONPATH={path}"${{{{PYTHONPATH:+:$PYTHONPATH}}}}" '
        f'{python} -m lambdapipe "$@"; }}}}; '
    )


# A prefix, not a param: moving the checkout must not count as a changed parameter.
shell.prefix("set -euo pipefail; " + lambdapipe_function())

RUNS = {run.path: run for run in expand_runs(config)}
# The prepared data is part of every run's identity, but Snakemake re-prepares a dataset whose
# `prepare:` block changed only where it has its metadata: stop before runs train on other data.
for _stale in stale_prepared(config, "data"):
    raise WorkflowError(_stale)
DATASETS = sorted({run.dataset for run in RUNS.values()})
# The run of each (dataset, noise, model) with the lowest seed gets `lambdapipe explain`.
EXPLAINED = {}
for _run in sorted(RUNS.values(), key=lambda r: r.seed):
    EXPLAINED.setdefault((_run.dataset, _run.noise, _run.model), _run)
EXPLAINED = sorted(r.path for r in EXPLAINED.values())
ARCHIVES = {dataset_info(d).archive: d for d in DATASETS if dataset_info(d).archive}
# train: {pack: seeds}: the unfinished seeds of a grid cell in one job. A rule's outputs
# are fixed paths around its wildcards, so there is one packed rule per distinct seed list,
# each matching only its cells; the commonest is named `train`, like the unpacked rule, so
# profiles that set resources for `train` apply to it. A finished run (its protected
# summary.json) joins no job: a seed added to a finished cell trains alone, and the job
# never has a protected output to refuse.
PACKED = config["train"]["pack"] in ("seeds", "fused")
PACKS = {}  # seed list -> {cell directory: its unfinished runs}
if PACKED:
    for _cell, _runs in pack_cells(RUNS.values()):
        _todo = [r for r in _runs if not Path(f"results/runs/{r.path}/summary.json").exists()]
        if _todo:
            PACKS.setdefault(tuple(r.seed for r in _todo), {})[_cell] = _todo
_commonest = sorted(PACKS, key=lambda seeds: (-len(PACKS[seeds]), -len(seeds), seeds))
PACK_RULES = {
    seeds: "train" if i == 0 else "train_seeds_" + "_".join(map(str, seeds))
    for i, seeds in enumerate(_commonest)
}


wildcard_constraints:
    dataset="|".join(DATASETS),
    noise=r"clean|[a-z]+-[0-9.e+-]+(-s[0-9]+)?",
    # <model>[@<variant>]-<fingerprint of the run's settings> (lambdapipe/provenance.py)
    model=r"[A-Za-z0-9_.]+(@[A-Za-z0-9.-]+)?-[0-9a-f]{8}",
    seed=r"[0-9]+",
    archive="|".join(ARCHIVES) or "(?!)",


def gpu_tokens(wildcards):
    """A GPU token per job (evaluate, explain), unless the config pins jobs to the CPU."""
    return 0 if config["train"]["device"] == "cpu" else 1


def train_gpu_tokens(wildcards):
    """A token per GPU of a training run (`train.gpus` x `train.nodes`), unless the config
    pins it to the CPU. Under SLURM: the job's --gpus (all nodes together)."""
    return gpu_tokens(wildcards) * config["train"]["gpus"] * config["train"]["nodes"]


def train_task_resources():
    """Under the slurm profile: --nodes, one task per GPU, the GPUs of each node, and a
    command that starts its own tasks (lambdapipe.slurm.task_resources); none for one GPU."""
    train = config["train"]
    return task_resources(train["gpus"], train["nodes"], bool(gpu_tokens(None)))


def check_gpu_tokens():
    """A run on N GPUs needs N `gpu` tokens: Snakemake would quietly cap its request to the
    machine's --resources gpu, and the run's extra ranks would wait for GPUs for ever."""
    given = workflow.global_resources.get("gpu")
    given = getattr(given, "value", given)  # a Snakemake Resource (9.x) or a number
    need = train_gpu_tokens(None)
    if need > 1 and given is not None and given < need:
        nodes = config["train"]["nodes"]
        what = f"train.gpus {config['train']['gpus']}" + (
            f" x train.nodes {nodes}" if nodes > 1 else ""
        )
        raise WorkflowError(
            f"config {what} needs --resources gpu={need} or more "
            f"(given gpu={given}): one token per GPU of a run"
        )


def train_launcher():
    """`lambdapipe` for a run on one GPU; for `train: {gpus: G, nodes: M}` `lambdapipe launch`
    starting G ranks of it on each of M nodes (lambdapipe/launch.py: torchrun on this machine,
    srun in a SLURM job; docs/distributed.md), each rank on its own GPU."""
    gpus, nodes = config["train"]["gpus"], config["train"]["nodes"]
    if gpus * nodes == 1:
        return "lambdapipe"
    return f"lambdapipe launch --gpus {gpus} --nodes {nodes}"


def eval_mem_mb(wildcards):
    """evaluate and explain load one split of the run's dataset and its model, less than
    training holds: the training job's request is an upper bound the scheduler already grants."""
    return config["train"]["mem_mb"]


def eval_runtime(wildcards):
    """One pass over a test split (explain: over a few images), minutes where training takes
    hours: an hour at most, never more than the training job's own request."""
    return min(60, config["train"]["runtime"])


def all_targets():
    runs = RUNS.values()
    return (
        [f"results/runs/{r.path}/summary.json" for r in runs]
        + [f"results/runs/{r.path}/eval_test.json" for r in runs]
        + [f"results/runs/{path}/explain_test.json" for path in EXPLAINED]
        + ["results/metrics.json", "results/report.md"]
    )


def run_of(wildcards):
    key = f"{wildcards.dataset}/{wildcards.noise}/{wildcards.model}/{wildcards.seed}"
    return RUNS[key]


def train_option(key):
    """params function: the run's `--recipe`, `--set ...` or `--model-arg ...` options."""
    return lambda wildcards: run_args(run_of(wildcards))[key]


def noise_options(wildcards):
    return noise_args(wildcards.noise)


def noise_args(tag):
    spec = parse_noise_tag(tag)
    return f"--noise {spec.rate:g} --noise-kind {spec.kind} --noise-seed {spec.seed}"


def cell_pattern(seeds):
    """wildcard constraint: exactly the cells packed with this seed list."""
    return "|".join(re.escape(cell) for cell in PACKS[seeds])


def pack_outputs(seeds):
    return [protected(f"results/runs/{{cell}}/{seed}/summary.json") for seed in seeds]


def pack_option(seeds, key):
    """params function of a packed rule: an option of its cell's runs (they share them)."""

    def option(wildcards):
        run = PACKS[seeds][wildcards.cell][0]
        return {**run_args(run), "dataset": run.dataset, "noise": noise_args(run.noise)}[key]

    return option


def pack_input(seeds, what):
    def path(wildcards):
        run = PACKS[seeds][wildcards.cell][0]
        if what == "manifest":
            return prepared(run.dataset)
        return f"data/prepared/{run.dataset}/noise/{run.noise}.npy"

    return path


def archive_of(wildcards):
    """The archive, while the dataset is not prepared yet. DVC tracks data/prepared, not
    data/raw: a clone that pulled prepared data has no archive and must not download it and
    redo every run downstream. (A changed `prepare:` block still reruns prepare, which
    fetches the archive itself.)"""
    archive = dataset_info(wildcards.dataset).archive
    if not archive or Path(prepared(wildcards.dataset)).exists():
        return []
    return [f"data/raw/{archive}"]


def mirror_option(wildcards=None):
    mirror = config.get("mirror")
    return f"--mirror {shlex.quote(str(mirror))}" if mirror else ""


def prepare_options(wildcards):
    return prepare_args(config, wildcards.dataset)


def prepared(dataset="{dataset}"):
    return f"data/prepared/{dataset}/manifest.json"
