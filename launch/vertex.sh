#!/usr/bin/env bash
# launch/vertex.sh [--dry-run] [flags]: writes trainer.yaml and builder.yaml (Vertex AI
# CustomJobSpecs) and submits them with `gcloud ai custom-jobs create` (`launch.py vertex --help`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "${ENV_FILE:-$here/env.sh}"
dry=(); if [ "${1-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
: "${REGION?set REGION (launch/env.sh)}" "${DOCKER_IMAGE?set DOCKER_IMAGE}" "${WORKDIR?set WORKDIR}"
exec python3 "$here/launch.py" "${dry[@]}" vertex "$@"
