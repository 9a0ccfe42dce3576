#!/usr/bin/env bash
# Run by Snakemake inside the new conda environment, from the workflow's working directory (the
# repository root): install the headperturb package itself, without touching the conda packages.
set -euo pipefail
python -m pip install --no-deps --no-build-isolation .
