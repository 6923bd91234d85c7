# lambdapipe workflow: prepare -> train -> evaluate -> report, one job per run of the grid.
#
#   snakemake --cores 2 --configfile config/demo.yaml      # the offline demo, minutes on a CPU
#   snakemake --cores 8 --resources gpu=4                   # the full grid, config/config.yaml
#   snakemake --profile profiles/slurm                      # the full grid on SLURM
#
# Rules only call the `lambdapipe` CLI; workflow/rules/common.smk holds the only Python.

from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from lambdapipe.config import check_config
from lambdapipe.errors import UserError

min_version("9.0")

SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"

# --configfile on the command line replaces the default grid instead of merging into it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# lambdapipe.config checks the schema first, for a one-line error naming the bad key, plus
# what no schema knows (registered models, recipe fields); then Snakemake's own check.
try:
    config.update(check_config(config, schema_path=SCHEMA))
except UserError as error:
    raise WorkflowError(str(error)) from None
validate(config, SCHEMA)


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True


# On SLURM, check every job's partition and GPU request against `sinfo` before the first
# sbatch: a profile the cluster cannot honour fails in one line (lambdapipe/slurm.py).
onstart:
    from lambdapipe.slurm import preflight

    preflight(workflow)
