#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine (root, Debian/Ubuntu), to try
# `snakemake --profile profiles/slurm` without a real one. Installs slurm-wlm and munge
# with apt-get if missing, starts munged + slurmctld + slurmd on 127.0.0.1 with one fake
# GPU gres, prints the environment line to paste into another shell, and stops every daemon
# on Ctrl-C / SIGTERM. Everything lives in DIR (default: a new temp dir, removed on exit).
#
#   scripts/slurm-local-cluster.sh [DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec python "$here/tests/slurm_cluster.py" "$@"
