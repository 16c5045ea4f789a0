#!/usr/bin/env bash
# Runs one command until it exits 0 (at most MAX_ATTEMPTS times); what `launch.py tpu-vm
# train|index-builder` starts detached on every worker:
#
#   bash launch/run_loop.sh ROLE MAX_ATTEMPTS RETRY_SECONDS -- COMMAND [ARGS...]
#
# Writes $REALM_LOG_DIR/ROLE.pid (the command's pid while it runs; `launch.py tpu-vm kill`
# signals it). A SIGTERM or SIGINT to this loop (preemption, `kill`) is forwarded once to the
# command as SIGTERM and creates ROLE.stop, so it is not retried; so does an existing ROLE.stop
# (created by `launch.py tpu-vm kill`). Any other nonzero exit (a crash, a lost peer host) is
# retried after RETRY_SECONDS. Exits with the command's last exit status.
set -u
role=${1?role}; max_attempts=${2?max attempts}; retry_seconds=${3?retry seconds}
shift 3
[ "${1-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "run_loop.sh: no command" >&2; exit 2; }
log_dir=${REALM_LOG_DIR:-$HOME/realm_jax_logs}
mkdir -p "$log_dir"
stop="$log_dir/$role.stop"; pidf="$log_dir/$role.pid"
rm -f "$stop"
attempt=0; rc=0; pid=
on_signal() {
  touch "$stop"
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null; fi
  trap '' TERM INT  # forward once: a second SIGTERM would interrupt the checkpoint save
}
trap on_signal TERM INT
while :; do
  attempt=$((attempt + 1))
  echo "[run_loop] $role attempt $attempt/$max_attempts started $(date -u +%FT%TZ)"
  "$@" &
  pid=$!
  echo "$pid" > "$pidf"
  # `wait` returns early when a trapped signal arrives: wait again until the command is gone.
  while :; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done
  echo "[run_loop] $role attempt $attempt exited $rc $(date -u +%FT%TZ)"
  if [ "$rc" -eq 0 ] || [ -e "$stop" ] || [ "$attempt" -ge "$max_attempts" ]; then break; fi
  sleep "$retry_seconds"
done
rm -f "$pidf"
exit "$rc"
