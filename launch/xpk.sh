#!/usr/bin/env bash
# launch/xpk.sh [--dry-run] [flags]: trainer and index builder as two XPK workloads on one GKE
# cluster sharing $WORKDIR (`launch.py xpk --help`). `xpk` must be on the PATH (pip install xpk
# in its own venv). --dry-run prints the xpk commands; --xpk-dry-run runs xpk's own dry run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "${ENV_FILE:-$here/env.sh}"
dry=(); if [ "${1-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
: "${CLUSTER?set CLUSTER (launch/env.sh)}" "${DOCKER_IMAGE?set DOCKER_IMAGE}" "${WORKDIR?set WORKDIR}"
exec python3 "$here/launch.py" "${dry[@]}" xpk "$@"
