# The workflow's only Python: the run list from the config grid, wildcard constraints and
# input/params functions. Validation and the grid's expansion live in lambdapipe.config, so
# `lambdapipe check-config` and this file can never disagree.

import shlex

from lambdapipe.config import expand_runs, prepare_args, published_as_args, run_args
from lambdapipe.data.registry import dataset_info
from lambdapipe.noise import parse_noise_tag

RUNS = {run.path: run for run in expand_runs(config)}
DATASETS = sorted({run.dataset for run in RUNS.values()})
# The run of each (dataset, noise, model) with the lowest seed gets `lambdapipe explain`.
EXPLAINED = {}
for _run in sorted(RUNS.values(), key=lambda r: r.seed):
    EXPLAINED.setdefault((_run.dataset, _run.noise, _run.model), _run)
EXPLAINED = sorted(r.path for r in EXPLAINED.values())
ARCHIVES = {dataset_info(d).archive: d for d in DATASETS if dataset_info(d).archive}


wildcard_constraints:
    dataset="|".join(DATASETS),
    noise=r"clean|[a-z]+-[0-9.e+-]+(-s[0-9]+)?",
    model=r"[A-Za-z0-9_.]+(@[A-Za-z0-9.-]+)?",
    seed=r"[0-9]+",
    archive="|".join(ARCHIVES) or "(?!)",


def gpu_tokens(wildcards):
    """A GPU token per job, unless the config pins jobs to the CPU."""
    return 0 if config["train"]["device"] == "cpu" else 1


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
    spec = parse_noise_tag(wildcards.noise)
    return f"--noise {spec.rate:g} --noise-kind {spec.kind} --noise-seed {spec.seed}"


def archive_of(wildcards):
    archive = dataset_info(wildcards.dataset).archive
    return [f"data/raw/{archive}"] if archive else []


def mirror_option(wildcards=None):
    mirror = config.get("mirror")
    return f"--mirror {shlex.quote(str(mirror))}" if mirror else ""


def prepare_options(wildcards):
    return prepare_args(config, wildcards.dataset)


def prepared(dataset="{dataset}"):
    return f"data/prepared/{dataset}/manifest.json"
