#!/usr/bin/env bash
# launch/tpu_vm.sh [--dry-run] create|queued-resource|scp|setup|train|index-builder|logs|kill|delete [flags]
# Thin wrapper: the command lines come from launch/launch.py (`launch.py tpu-vm --help`).
# Settings: launch/env.sh (sourced if ENV_FILE or launch/env.sh exists); flags win.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "${ENV_FILE:-$here/env.sh}"
dry=(); if [ "${1-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
: "${ZONE?set ZONE (launch/env.sh)}"
exec python3 "$here/launch.py" "${dry[@]}" tpu-vm "$@"
