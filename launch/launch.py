#!/usr/bin/env python3
r"""Launch realm_jax's one command on TPU VMs, XPK (GKE) or Vertex AI; `--dry-run` prints it.

Every subcommand builds the exact argv of one cloud command (sometimes two: a local
`git archive` before an scp) around the project's one CLI,
`python -m realm_jax.main --mode=train|index_builder --config=... --workdir=gs://...`,
prints it (shell-quoted, one line per command) and, without `--dry-run`, runs it and stops at
the first failure. Standard library only, so it runs from any Python 3.9+.

  python3 launch/launch.py --dry-run tpu-vm create --name=realm-v4 --zone=us-central2-b \
      --accelerator-type=v4-32 --spot
  python3 launch/launch.py --dry-run tpu-vm train --name=realm-v4 --zone=us-central2-b \
      --accelerator-type=v4-32 --config=experiments/realm_wiki.py:size=base \
      --workdir=gs://BUCKET/runs/base --restart-on-preemption=20
  python3 launch/launch.py --dry-run xpk --cluster=C --zone=us-west4-a --project=P \
      --tpu-type=v5litepod-64 --builder-tpu-type=v5litepod-8 --docker-image=IMG \
      --config=experiments/realm_wiki.py:size=base --workdir=gs://BUCKET/runs/base
  python3 launch/launch.py --dry-run vertex --region=us-central1 --project=P --image=IMG \
      --config=... --workdir=gs://... --out-dir=/tmp/vertex_jobs

Defaults come from the environment (launch/env.sh lists the variables: TPU_NAME, ZONE, ...),
flags win. See launch/README.md for the walk-through and what was (not) run for real.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "realm_jax.main"
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"  # v4; v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5
DEFAULT_REPO_DIR = "~/realm_jax"
LOG_DIR = "~/realm_jax_logs"
TARBALL = "realm_jax.tar.gz"
ROLES = {"train": "train", "index-builder": "index_builder"}
XPK_RESTART_EXIT_CODE = 42  # xpk/JobSet restart a failed pod on 42 and 127-255

# Python run as `python -c SIGTERM_PRELUDE --mode=... ...`: the project's CLI (sys.argv[1:] are
# its flags, untouched) with SIGTERM mapped to KeyboardInterrupt. TPU VM maintenance/Spot
# preemption, GKE pod deletion and Vertex AI all send SIGTERM before they kill. Inside the
# training loops and the builder the project's own handler replaces this one (train/preemption.py:
# finish the step, checkpoint, exit 0 or --preempted_exit_code); the prelude covers the rest
# (start-up, evaluation): Ctrl-C's path, exit 130, and the same command resumes.
# The first SIGTERM raises KeyboardInterrupt, later ones are ignored (they would interrupt the
# save). Double quotes only, so the remote shells' single quoting stays readable.
SIGTERM_PRELUDE = (
    "import runpy, signal; signal.signal(signal.SIGTERM, lambda *_: (signal.signal("
    "signal.SIGTERM, signal.SIG_IGN), signal.default_int_handler(*_))); "
    'runpy.run_module("{module}", run_name="__main__", alter_sys=True)')

# name -> (valid sizes predicate, TensorCores per chip, chips per host of a multi-host slice).
# The number in the name counts TensorCores for v2-v4/v5p and chips for v5e (v5litepod)/v6e.
ACCELERATORS: dict[str, tuple[Callable[[int], bool], int, int]] = {
    "v2": (lambda n: n in (8, 32, 128, 256, 512), 2, 4),
    "v3": (lambda n: n in (8, 32, 64, 128, 256, 512, 1024, 2048), 2, 4),
    "v4": (lambda n: n % 8 == 0 and 8 <= n <= 8192, 2, 4),
    "v5p": (lambda n: n % 8 == 0 and 8 <= n <= 12288, 2, 4),
    "v5litepod": (lambda n: n in (1, 4, 8, 16, 32, 64, 128, 256), 1, 4),
    "v6e": (lambda n: n in (1, 4, 8, 16, 32, 64, 128, 256), 1, 4),
}
_ACCEL_RE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)$")
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE_RE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")
_REGION_RE = re.compile(r"^[a-z]+-[a-z]+\d+$")
# Vertex AI GPU machine types -> (accelerator type, GPUs per machine).
VERTEX_GPUS = {
    "a2-highgpu-1g": ("NVIDIA_TESLA_A100", 1), "a2-highgpu-8g": ("NVIDIA_TESLA_A100", 8),
    "a2-ultragpu-8g": ("NVIDIA_A100_80GB", 8), "a3-highgpu-8g": ("NVIDIA_H100_80GB", 8),
    "g2-standard-48": ("NVIDIA_L4", 4),
}
# Vertex AI TPU machine types (single host) -> TPU topology.
VERTEX_TPUS = {"ct5lp-hightpu-1t": "1x1", "ct5lp-hightpu-4t": "2x2", "ct5lp-hightpu-8t": "2x4"}


class LaunchError(ValueError):
  """A bad argument; main() prints `launch error: ...` and exits 2."""


# ---- validation -----------------------------------------------------------------------------


def parse_accelerator(name: str) -> tuple[str, int, int]:
  """`v4-32` -> ("v4", chips=16, hosts=4); a LaunchError naming the valid forms otherwise."""
  match = _ACCEL_RE.match(name or "")
  if not match:
    raise LaunchError(
        f"unknown accelerator type {name!r}: expected <generation>-<size> with generation one "
        f"of {', '.join(ACCELERATORS)} (e.g. v4-32, v5litepod-64, v5p-128, v6e-16)")
  generation, size = match.group(1), int(match.group(2))
  valid, cores_per_chip, chips_per_host = ACCELERATORS[generation]
  if not valid(size):
    examples = [f"{generation}-{n}" for n in range(1, 257) if valid(n)][:4]
    raise LaunchError(f"{name!r} is not a {generation} slice size (valid: "
                      f"{', '.join(examples)}, ...)")
  chips = size // cores_per_chip
  if generation in ("v5litepod", "v6e") and chips <= 8:
    hosts = 1  # the 1-, 4- and 8-chip shapes are one VM
  elif generation in ("v2", "v3", "v4", "v5p") and chips <= 4:
    hosts = 1
  else:
    hosts = chips // chips_per_host
  return generation, chips, hosts


def gke_hosts(name: str) -> int:
  """VMs of one slice on GKE: xpk uses 4-chip node machines (1-chip shapes excepted), so a
  v5litepod-8 is one VM on the TPU VM API but 2 pods under xpk."""
  _, chips, _ = parse_accelerator(name)
  return 1 if chips <= 4 else chips // 4


def check_name(kind: str, value: str | None) -> str:
  if not value:
    raise LaunchError(f"--{kind} is required (or set its environment variable, launch/env.sh)")
  if not _NAME_RE.match(value):
    raise LaunchError(f"--{kind}={value!r}: lowercase letters, digits and '-', starting with a "
                      "letter, at most 63 characters")
  return value


def check_zone(zone: str | None) -> str:
  if not zone:
    raise LaunchError("--zone is required (e.g. us-central2-b for v4, us-west4-a for v5e)")
  if not _ZONE_RE.match(zone):
    raise LaunchError(f"--zone={zone!r} is not a zone (e.g. us-central2-b)")
  return zone


def check_region(region: str | None) -> str:
  if not region:
    raise LaunchError("--region is required (e.g. us-central1)")
  if not _REGION_RE.match(region):
    raise LaunchError(f"--region={region!r} is not a region (e.g. us-central1, not a zone)")
  return region


def check_workdir(workdir: str | None, allow_local: bool = False) -> str:
  """gs:// unless allowed: the trainer's hosts and the builder's share it, so no local path."""
  if not workdir:
    raise LaunchError("--workdir is required (gs://BUCKET/PATH, shared by trainer and builder)")
  if not workdir.startswith("gs://") and not allow_local:
    raise LaunchError(
        f"--workdir={workdir!r} is not gs://: every host of a multi-host trainer and the "
        "separate index builder must see the same checkpoints and index versions (pass "
        "--allow-local-workdir only for one single-host VM that runs both)")
  if workdir.startswith("gs://") and not re.match(r"^gs://[a-z0-9][-_.a-z0-9]{1,221}[a-z0-9](/|$)",
                                                  workdir):
    raise LaunchError(f"--workdir={workdir!r}: not a valid gs://BUCKET/PATH")
  return workdir.rstrip("/")


def check_config(config: str | None, root: str = ROOT) -> str:
  """`experiments/<x>.py[:args]` that exists in this checkout (the one the VMs install)."""
  if not config:
    raise LaunchError("--config is required, e.g. experiments/realm_wiki.py:size=base")
  path = config.split(":", 1)[0]
  if not path.endswith(".py"):
    raise LaunchError(f"--config={config!r}: expected experiments/<name>.py[:args]")
  if os.path.isabs(path) or not os.path.exists(os.path.join(root, path)):
    raise LaunchError(f"--config={config!r}: {path} is not a file of this checkout (a path "
                      "relative to the repository root, which is what the remote hosts run in)")
  return config


def check_sets(sets: Sequence[str]) -> list[str]:
  """`--set train.batch_size=64` -> `--config.train.batch_size=64`."""
  out = []
  for item in sets or ():
    key, eq, value = item.partition("=")
    if not eq or not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", key):
      raise LaunchError(f"--set {item!r}: expected FIELD=VALUE, e.g. train.batch_size=64")
    out.append(f"--config.{key}={value}")
  return out


# ---- the project's command ------------------------------------------------------------------


def realm_flags(mode: str, config: str | None, workdir: str, distributed: bool,
                sets: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
  """The flags of `python -m realm_jax.main` (without the interpreter)."""
  flags = [f"--mode={mode}"]
  if config:
    flags.append(f"--config={config}")
  flags += list(sets)
  flags.append(f"--workdir={workdir}")
  if distributed:
    flags.append("--distributed")
  return flags + list(extra)


def python_argv(python: str, flags: Sequence[str], sigterm_as_interrupt: bool = True,
                module: str = MODULE) -> list[str]:
  """`python -m realm_jax.main FLAGS`, or the same CLI behind the SIGTERM prelude."""
  if sigterm_as_interrupt:
    return [python, "-c", SIGTERM_PRELUDE.format(module=module), *flags]
  return [python, "-m", module, *flags]


def loop_argv(role: str, argv: Sequence[str], max_attempts: int,
              retry_seconds: int = 30) -> list[str]:
  """`bash launch/run_loop.sh ROLE MAX RETRY -- argv`: retries crashes, never a SIGTERM."""
  return ["bash", "launch/run_loop.sh", ROLES[role], str(int(max_attempts)),
          str(int(retry_seconds)), "--", *argv]


# ---- printing and running -------------------------------------------------------------------


def quote(argv: Sequence[str]) -> str:
  return " ".join(shlex.quote(a) for a in argv)


def execute(commands: Sequence[Sequence[str]], dry_run: bool, out=None,
            runner: Callable[..., int] | None = None) -> int:
  """Prints each command; runs them in order unless dry_run. Returns the first nonzero rc."""
  out = out or sys.stdout
  for argv in commands:
    print(("(dry run) " if dry_run else "+ ") + quote(argv), file=out, flush=True)
    if not dry_run:
      rc = (runner or (lambda a: subprocess.call(list(a))))(argv)
      if rc:
        print(f"launch: command exited {rc}: {argv[0]} ...", file=sys.stderr)
        return rc
  return 0


# ---- tpu-vm ---------------------------------------------------------------------------------


def _project(args) -> list[str]:
  return [f"--project={args.project}"] if args.project else []


def _ssh(args, name: str, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={args.zone}",
          *_project(args), f"--worker={worker}", f"--command={command}"]


def _capacity(args) -> list[str]:
  if args.spot and args.preemptible:
    raise LaunchError("--spot and --preemptible: choose one (Spot is the newer of the two)")
  return ["--spot"] if args.spot else ["--preemptible"] if args.preemptible else []


def setup_script(repo_dir: str, repo_url: str | None, ref: str, extras: str, python: str) -> str:
  """Bash run on every worker: Python, the source (git clone or the scp'd tarball), the venv."""
  if repo_url:
    fetch = (f"if [ -d {repo_dir}/.git ]; then git -C {repo_dir} fetch -q origin; "
             f"else git clone -q {shlex.quote(repo_url)} {repo_dir}; fi; "
             f"git -C {repo_dir} checkout -q {shlex.quote(ref)}")
  else:
    fetch = f"mkdir -p {repo_dir} && tar -xzf ~/{TARBALL} -C {repo_dir}"
  extras_spec = f"[{extras}]" if extras else ""
  return "; ".join([
      "set -euo pipefail",
      f"command -v {python} >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q "
      f"{python} {python}-venv)",
      fetch,
      f"cd {repo_dir}",
      f"{python} -m venv .venv",
      ".venv/bin/pip install -q --upgrade pip",
      "constraints=; [ -f constraints.txt ] && constraints='-c constraints.txt'",
      f".venv/bin/pip install -q $constraints -e {shlex.quote('.' + extras_spec)}",
      f".venv/bin/python -c 'import realm_jax.main' && mkdir -p {LOG_DIR} && "
      "echo \"setup done on $(hostname)\"",
  ])


def role_files(role: str) -> tuple[str, str, str]:
  base = f"{LOG_DIR}/{ROLES[role]}"
  return f"{base}.log", f"{base}.stop", f"{base}.pid"


def tpu_vm_role_command(args, role: str) -> str:
  """The detached remote command that runs one role on every worker of the VM."""
  _, _, hosts = parse_accelerator(args.accelerator_type)
  workdir = check_workdir(args.workdir, args.allow_local_workdir)
  if hosts > 1 and not workdir.startswith("gs://"):
    raise LaunchError(f"--workdir={workdir!r}: {args.accelerator_type} has {hosts} hosts; "
                      "a multi-host run needs a gs:// workdir")
  config = check_config(args.config) if (args.config or role == "train") else None
  extra = ["--max_builds=%d" % args.max_builds] if role == "index-builder" and args.max_builds \
      else []
  if args.force:
    extra.append("--force")
  flags = realm_flags(ROLES[role], config, workdir, hosts > 1, check_sets(args.set), extra)
  argv = python_argv(".venv/bin/python", flags, not args.no_sigterm_as_interrupt)
  log = role_files(role)[0]
  loop = loop_argv(role, argv, args.restart_on_preemption + 1, args.retry_seconds)
  return (f"cd {args.repo_dir} && mkdir -p {LOG_DIR} && "
          f"nohup {quote(loop)} > {log} 2>&1 < /dev/null &")


def tpu_vm_commands(args) -> list[list[str]]:
  name = check_name("name", args.name)
  check_zone(args.zone)
  sub = args.tpu_command
  gcloud = ["gcloud", "compute", "tpus"]
  if sub in ("create", "queued-resource"):
    parse_accelerator(args.accelerator_type)
    if sub == "create":
      return [gcloud + ["tpu-vm", "create", name, f"--zone={args.zone}", *_project(args),
                        f"--accelerator-type={args.accelerator_type}",
                        f"--version={args.runtime_version}", *_capacity(args)]]
    return [gcloud + ["queued-resources", "create", name, f"--node-id={name}",
                      f"--zone={args.zone}", *_project(args),
                      f"--accelerator-type={args.accelerator_type}",
                      f"--runtime-version={args.runtime_version}", *_capacity(args)]]
  if sub == "scp":
    tarball = os.path.join(args.tmp_dir, TARBALL)
    return [["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", tarball, "HEAD"],
            gcloud + ["tpu-vm", "scp", tarball, f"{name}:~/{TARBALL}", f"--zone={args.zone}",
                      *_project(args), "--worker=all"]]
  if sub == "setup":
    return [_ssh(args, name, setup_script(args.repo_dir, args.repo_url, args.ref, args.extras,
                                          args.python))]
  if sub in ROLES:
    return [_ssh(args, name, tpu_vm_role_command(args, sub))]
  if sub == "logs":
    log = role_files(args.role)[0]
    return [_ssh(args, name, f"tail -n {args.lines} {'-F ' if args.follow else ''}{log}",
                 worker=str(args.worker))]
  if sub == "kill":
    _, stop, pid = role_files(args.role)
    return [_ssh(args, name, f"touch {stop}; [ -f {pid} ] && kill -TERM \"$(cat {pid})\" && "
                 f"echo \"sent SIGTERM to {ROLES[args.role]} on $(hostname)\" || "
                 f"echo \"no {ROLES[args.role]} running on $(hostname)\"")]
  if sub == "delete":
    return [gcloud + ["tpu-vm", "delete", name, f"--zone={args.zone}", *_project(args),
                      "--quiet"]]
  raise LaunchError(f"unknown tpu-vm command {sub!r}")


# ---- xpk ------------------------------------------------------------------------------------


def xpk_commands(args) -> list[list[str]]:
  """Two `xpk workload create` commands, trainer and builder, same config and workdir."""
  cluster = check_name("cluster", args.cluster)
  check_zone(args.zone)
  if not args.docker_image:
    raise LaunchError("--docker-image is required (built from launch/Dockerfile)")
  workdir = check_workdir(args.workdir)
  config = check_config(args.config)
  sets = check_sets(args.set)
  if args.num_slices < 1:
    raise LaunchError(f"--num-slices={args.num_slices}: at least 1")
  prefix = check_name("workload-prefix", args.workload_prefix)
  jobs = []
  for role, tpu_type, slices in (("train", args.tpu_type, args.num_slices),
                                 ("index-builder", args.builder_tpu_type, 1)):
    if args.only not in ("both", "train" if role == "train" else "builder"):
      continue
    if not tpu_type:
      raise LaunchError(f"--{'builder-' if role != 'train' else ''}tpu-type is required "
                        "(e.g. v5litepod-64 for the trainer, v5litepod-8 for the builder)")
    # JobSet restarts a workload on exit 42 (and 127-255) only: a preempted trainer or builder
    # (SIGTERM: checkpoint saved / build abandoned) exits 42 so that it is restarted.
    flags = realm_flags(ROLES[role], config, workdir, gke_hosts(tpu_type) * slices > 1, sets,
                        [f"--preempted_exit_code={XPK_RESTART_EXIT_CODE}"])
    # `exec` would not help here: xpk wraps --command in its own bash that traps SIGTERM and
    # forwards it to this process (see launch/README.md), and the prelude does the rest.
    command = quote(python_argv("python", flags, not args.no_sigterm_as_interrupt))
    workload = f"{prefix}-{'train' if role == 'train' else 'builder'}"
    argv = ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={workload}",
            f"--tpu-type={tpu_type}", f"--num-slices={slices}",
            f"--docker-image={args.docker_image}", f"--command={command}",
            f"--zone={args.zone}", *_project(args),
            f"--max-restarts={args.max_restarts}",
            f"--termination-grace-period-seconds={args.grace_seconds}",
            f"--priority={args.priority}"]
    if args.spot:
      argv.append("--spot")
    if args.xpk_dry_run:
      argv += ["--dry-run", "--skip-validation"]
      if args.manifest_dir:
        argv.append(f"--output-manifest-file={os.path.join(args.manifest_dir, workload)}.yaml")
    jobs.append(argv)
  return jobs


# ---- vertex ---------------------------------------------------------------------------------


def to_yaml(value, indent: int = 0) -> str:
  """Minimal YAML for dicts, lists, str/int/bool (strings JSON-quoted, which YAML reads)."""
  pad = " " * indent
  if isinstance(value, dict):
    lines = []
    for key, item in value.items():
      if isinstance(item, (dict, list)) and item:
        lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
      else:
        lines.append(f"{pad}{key}: {to_yaml(item).strip()}")
    return "\n".join(lines)
  if isinstance(value, list):
    lines = []
    for item in value:
      text = to_yaml(item, indent + 2)
      lines.append(f"{pad}- {text.lstrip()}")
    return "\n".join(lines)
  if isinstance(value, bool):
    return pad + ("true" if value else "false")
  if isinstance(value, int):
    return pad + str(value)
  return pad + json.dumps(str(value))


def vertex_job_spec(role: str, machine_type: str, image: str, flags: Sequence[str],
                    sigterm_as_interrupt: bool, spot: bool, restart: bool) -> dict:
  """A Vertex AI CustomJobSpec (what `gcloud ai custom-jobs create --config` reads)."""
  if machine_type in VERTEX_GPUS:
    accelerator, count = VERTEX_GPUS[machine_type]
    machine = {"machineType": machine_type, "acceleratorType": accelerator,
               "acceleratorCount": count}
  elif machine_type in VERTEX_TPUS:
    machine = {"machineType": machine_type, "tpuTopology": VERTEX_TPUS[machine_type]}
  else:
    raise LaunchError(f"--{'builder-' if role != 'train' else ''}machine-type={machine_type!r}: "
                      f"one of {', '.join(list(VERTEX_GPUS) + list(VERTEX_TPUS))}")
  argv = python_argv("python", flags, sigterm_as_interrupt)
  spec = {"workerPoolSpecs": [{
      "machineSpec": machine, "replicaCount": 1, "diskSpec": {"bootDiskSizeGb": 200},
      "containerSpec": {"imageUri": image, "command": argv[:3], "args": argv[3:]}}]}
  scheduling = {"restartJobOnWorkerRestart": bool(restart)}
  if spot:
    scheduling["strategy"] = "SPOT"
  spec["scheduling"] = scheduling
  return spec


def vertex_commands(args, write: bool = True) -> tuple[list[list[str]], dict[str, dict]]:
  """Writes <out-dir>/{trainer,builder}.yaml; the two `gcloud ai custom-jobs create` commands."""
  region = check_region(args.region)
  if not args.image:
    raise LaunchError("--image is required (built from launch/Dockerfile)")
  if args.replica_count != 1:
    raise LaunchError(
        f"--replica-count={args.replica_count}: only 1 machine per job. The CLI's "
        "--distributed calls jax.distributed.initialize() with no arguments, which has no "
        "Vertex AI auto-detection; multi-host runs go through tpu-vm or xpk")
  workdir = check_workdir(args.workdir)
  config = check_config(args.config)
  sets = check_sets(args.set)
  commands, specs = [], {}
  for role, machine, name in (("train", args.machine_type, "trainer"),
                              ("index-builder", args.builder_machine_type, "builder")):
    flags = realm_flags(ROLES[role], config, workdir, False, sets)
    spec = vertex_job_spec(role, machine, args.image, flags, not args.no_sigterm_as_interrupt,
                           args.spot, args.restart_on_preemption)
    path = os.path.join(args.out_dir, f"{name}.yaml")
    specs[path] = spec
    if write:
      os.makedirs(args.out_dir, exist_ok=True)
      with open(path, "w") as f:
        f.write(to_yaml(spec) + "\n")
    commands.append(["gcloud", "ai", "custom-jobs", "create", f"--region={region}",
                     *_project(args), f"--display-name={args.display_name}-{name}",
                     f"--config={path}"])
  return commands, specs


# ---- argument parsing -----------------------------------------------------------------------


def _env(env: Mapping[str, str], key: str, default=None):
  value = env.get(key)
  return value if value not in (None, "") else default


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
  env = os.environ if env is None else env
  parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n")[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="print every command instead of running it")
  top = parser.add_subparsers(dest="target", required=True)

  def common(p, name_env="TPU_NAME", name=True):
    if name:
      p.add_argument("--name", default=_env(env, name_env),
                     help=f"TPU VM / queued resource name (${name_env})")
    p.add_argument("--zone", default=_env(env, "ZONE"), help="$ZONE")
    p.add_argument("--project", default=_env(env, "PROJECT"), help="$PROJECT (else gcloud's)")

  def run_args(p, role):
    builder = role == "index-builder"
    p.add_argument("--config", default=_env(env, "CONFIG"),
                   help="experiments/<x>.py[:args] ($CONFIG)" +
                   ("; the builder may omit it and read <workdir>/config.json" if builder else ""))
    p.add_argument("--workdir", default=_env(env, "WORKDIR"), help="gs://... ($WORKDIR)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override, passed as --config.FIELD=VALUE (repeatable)")
    p.add_argument("--no-sigterm-as-interrupt", action="store_true",
                   help="run `python -m realm_jax.main` plainly (SIGTERM kills it unsaved)")

  tpu = top.add_parser("tpu-vm", help="gcloud compute tpus tpu-vm ...")
  tsub = tpu.add_subparsers(dest="tpu_command", required=True)
  for sub in ("create", "queued-resource"):
    p = tsub.add_parser(sub)
    common(p)
    p.add_argument("--accelerator-type", default=_env(env, "ACCELERATOR_TYPE"),
                   help="v4-32, v5litepod-64, ... ($ACCELERATOR_TYPE)")
    p.add_argument("--runtime-version", "--version", dest="runtime_version",
                   default=_env(env, "RUNTIME_VERSION", DEFAULT_RUNTIME),
                   help=f"TPU software version ($RUNTIME_VERSION, default {DEFAULT_RUNTIME}; "
                   "v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--preemptible", action="store_true")
  p = tsub.add_parser("scp", help="git archive HEAD, copy it to every worker")
  common(p)
  p.add_argument("--tmp-dir", default="/tmp")
  p = tsub.add_parser("setup", help="install the project on every worker")
  common(p)
  p.add_argument("--repo-url", default=_env(env, "REPO_URL"),
                 help="git URL to clone ($REPO_URL); without it: the tarball `scp` copied")
  p.add_argument("--ref", default=_env(env, "REPO_REF", "main"))
  p.add_argument("--repo-dir", default=DEFAULT_REPO_DIR)
  p.add_argument("--extras", default=_env(env, "EXTRAS", "tpu,gcs"),
                 help="pip extras of the project (default tpu,gcs)")
  p.add_argument("--python", default="python3.11")
  for role in ROLES:
    p = tsub.add_parser(role, help=f"start --mode={ROLES[role]} detached on every worker")
    common(p, "BUILDER_NAME" if role == "index-builder" else "TPU_NAME")
    p.add_argument("--accelerator-type", default=_env(
        env, "BUILDER_ACCELERATOR_TYPE" if role == "index-builder" else "ACCELERATOR_TYPE"),
                   help="the VM's type: decides --distributed (more than one host)")
    run_args(p, role)
    p.add_argument("--repo-dir", default=DEFAULT_REPO_DIR)
    p.add_argument("--restart-on-preemption", type=int, default=0, metavar="N",
                   help="re-run after a crash (nonzero exit) up to N times; a SIGTERM "
                   "(kill, preemption) is never retried")
    p.add_argument("--retry-seconds", type=int, default=30)
    p.add_argument("--allow-local-workdir", action="store_true")
    p.add_argument("--force", action="store_true", help="pass --force (take over the lease)")
    p.add_argument("--max-builds", type=int, default=0, help=argparse.SUPPRESS
                   if role == "train" else "index builder: exit after N versions")
  for sub in ("logs", "kill"):
    p = tsub.add_parser(sub)
    common(p)
    p.add_argument("--role", choices=list(ROLES), default="train")
    if sub == "logs":
      p.add_argument("--worker", default="0")
      p.add_argument("--lines", type=int, default=100)
      p.add_argument("--follow", action="store_true")
  p = tsub.add_parser("delete")
  common(p)

  p = top.add_parser("xpk", help="trainer and builder as two `xpk workload create`")
  p.add_argument("--cluster", default=_env(env, "CLUSTER"))
  common(p, name=False)
  p.add_argument("--tpu-type", default=_env(env, "ACCELERATOR_TYPE"))
  p.add_argument("--num-slices", type=int, default=1)
  p.add_argument("--builder-tpu-type", default=_env(env, "BUILDER_ACCELERATOR_TYPE"))
  p.add_argument("--docker-image", default=_env(env, "DOCKER_IMAGE"))
  p.add_argument("--workload-prefix", default=_env(env, "WORKLOAD_PREFIX", "realm"))
  p.add_argument("--only", default="both", choices=["both", "train", "builder"])
  p.add_argument("--max-restarts", type=int, default=10,
                 help="JobSet restarts (xpk restarts on exit 42 and 127-255: a preempted "
                 "trainer/builder exits 42 here, a SIGTERM outside the loops 130; 1, an error, "
                 "is not retried)")
  p.add_argument("--grace-seconds", type=int, default=300,
                 help="pod termination grace: time for the SIGTERM checkpoint save")
  p.add_argument("--priority", default="medium",
                 choices=["very-low", "low", "medium", "high", "very-high"])
  p.add_argument("--spot", action="store_true")
  p.add_argument("--xpk-dry-run", action="store_true",
                 help="add xpk's own --dry-run (prints the kubectl/gcloud it would run, offline)")
  p.add_argument("--manifest-dir", help="with --xpk-dry-run: write each JobSet YAML here")
  run_args(p, "train")

  p = top.add_parser("vertex", help="two Vertex AI custom jobs (YAML + gcloud)")
  p.add_argument("--region", default=_env(env, "REGION"))
  p.add_argument("--project", default=_env(env, "PROJECT"))
  p.add_argument("--image", default=_env(env, "DOCKER_IMAGE"))
  p.add_argument("--machine-type", default="a2-highgpu-8g",
                 help=f"trainer: {', '.join(list(VERTEX_GPUS) + list(VERTEX_TPUS))}")
  p.add_argument("--builder-machine-type", default="a2-highgpu-1g")
  p.add_argument("--replica-count", type=int, default=1)
  p.add_argument("--display-name", default="realm")
  p.add_argument("--out-dir", default="/tmp/realm_vertex_jobs")
  p.add_argument("--spot", action="store_true")
  p.add_argument("--restart-on-preemption", action="store_true",
                 help="scheduling.restartJobOnWorkerRestart")
  run_args(p, "train")
  return parser


def commands_for(args) -> list[list[str]]:
  if args.target == "tpu-vm":
    return tpu_vm_commands(args)
  if args.target == "xpk":
    return xpk_commands(args)
  return vertex_commands(args)[0]


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
         out=None, runner=None) -> int:
  args = build_parser(env).parse_args(argv)
  try:
    commands = commands_for(args)
  except LaunchError as e:
    print(f"launch error: {e}", file=sys.stderr)
    return 2
  return execute(commands, args.dry_run, out, runner)


if __name__ == "__main__":
  sys.exit(main())
