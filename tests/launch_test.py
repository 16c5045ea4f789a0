"""launch/launch.py: the exact command lines, validation, dry run, and the remote CLI is real.

Nothing here contacts the network: gcloud is only asked to parse (no account is configured, so
each command stops at the credentials check after its flags parsed), xpk runs with its own
--dry-run, and Vertex jobs are written, never submitted.
"""

import importlib.util
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("launch_py", os.path.join(ROOT, "launch",
                                                                         "launch.py"))
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)

CONFIG = "experiments/realm_wiki.py:size=base"
WORKDIR = "gs://my-bucket/runs/base"
PRELUDE = launch.SIGTERM_PRELUDE.format(module="realm_jax.main")
TPU = ["--name=realm-v4", "--zone=us-central2-b"]


def commands(argv):
  return launch.commands_for(launch.build_parser(env={}).parse_args(argv))


def run_main(argv):
  out, err = io.StringIO(), io.StringIO()
  calls = []
  old = sys.stderr
  sys.stderr = err
  try:
    rc = launch.main(argv, env={}, out=out, runner=lambda a: calls.append(list(a)) or 0)
  finally:
    sys.stderr = old
  return rc, out.getvalue(), err.getvalue(), calls


def remote_python(ssh_argv):
  """The python argv inside an `ssh --command=cd ... && nohup bash run_loop.sh ... -- ARGV >`."""
  command = ssh_argv[-1]
  assert command.startswith("--command=")
  words = shlex.split(command[len("--command="):])
  loop = words[words.index("nohup") + 1:words.index(">")]
  assert loop[:2] == ["bash", "launch/run_loop.sh"]
  return loop, loop[loop.index("--") + 1:]


# ---- accelerators and validation ------------------------------------------------------------


def test_parse_accelerator():
  assert launch.parse_accelerator("v4-8") == ("v4", 4, 1)
  assert launch.parse_accelerator("v4-32") == ("v4", 16, 4)
  assert launch.parse_accelerator("v5p-128") == ("v5p", 64, 16)
  assert launch.parse_accelerator("v5litepod-8") == ("v5litepod", 8, 1)
  assert launch.parse_accelerator("v5litepod-64") == ("v5litepod", 64, 16)
  assert launch.parse_accelerator("v6e-16") == ("v6e", 16, 4)
  # GKE (xpk) slices are 4-chip VMs: a v5litepod-8 is 2 pods there (xpk's manifest agrees).
  assert [launch.gke_hosts(t) for t in ("v5litepod-8", "v5litepod-64", "v4-8", "v5litepod-1")
         ] == [2, 16, 1, 1]
  for bad in ("v4-33", "v5litepod-12", "v5e-64", "tpu-v4-32", "v4", "", "V4-32"):
    with pytest.raises(launch.LaunchError):
      launch.parse_accelerator(bad)


@pytest.mark.parametrize("argv,message", [
    (["tpu-vm", "create", *TPU, "--accelerator-type=v4-33"], "not a v4 slice size"),
    (["tpu-vm", "create", *TPU, "--accelerator-type=v5e-64"], "unknown accelerator type"),
    (["tpu-vm", "create", *TPU], "unknown accelerator type None"),
    (["tpu-vm", "create", "--name=realm-v4", "--accelerator-type=v4-8"], "--zone is required"),
    (["tpu-vm", "create", "--name=realm-v4", "--zone=us-central2", "--accelerator-type=v4-8"],
     "is not a zone"),
    (["tpu-vm", "create", "--zone=us-central2-b", "--accelerator-type=v4-8"],
     "--name is required"),
    (["tpu-vm", "create", "--name=Realm_V4", "--zone=us-central2-b", "--accelerator-type=v4-8"],
     "lowercase letters"),
    (["tpu-vm", "create", *TPU, "--accelerator-type=v4-8", "--spot", "--preemptible"],
     "choose one"),
    (["tpu-vm", "train", *TPU, "--accelerator-type=v4-32", f"--config={CONFIG}",
      "--workdir=/tmp/run"], "is not gs://"),
    (["tpu-vm", "train", *TPU, "--accelerator-type=v4-32", f"--config={CONFIG}",
      "--workdir=/tmp/run", "--allow-local-workdir"], "needs a gs:// workdir"),
    (["tpu-vm", "train", *TPU, "--accelerator-type=v4-32", f"--config={CONFIG}"],
     "--workdir is required"),
    (["tpu-vm", "train", *TPU, "--accelerator-type=v4-32", f"--workdir={WORKDIR}"],
     "--config is required"),
    (["tpu-vm", "train", *TPU, "--accelerator-type=v4-32", "--config=experiments/nope.py",
      f"--workdir={WORKDIR}"], "not a file of this checkout"),
    (["tpu-vm", "train", *TPU, "--accelerator-type=v4-32", f"--config={CONFIG}",
      f"--workdir={WORKDIR}", "--set", "train.batch_size"], "expected FIELD=VALUE"),
    (["tpu-vm", "train", *TPU, f"--config={CONFIG}", f"--workdir={WORKDIR}"],
     "unknown accelerator type"),
    (["xpk", "--cluster=c", "--zone=us-west4-a", "--tpu-type=v5litepod-64",
      "--builder-tpu-type=v5litepod-8", f"--config={CONFIG}", f"--workdir={WORKDIR}"],
     "--docker-image is required"),
    (["xpk", "--cluster=c", "--zone=us-west4-a", "--tpu-type=v5litepod-64", "--docker-image=i",
      f"--config={CONFIG}", f"--workdir={WORKDIR}"], "--builder-tpu-type is required"),
    (["xpk", "--cluster=c", "--zone=us-west4-a", "--tpu-type=v5litepod-64",
      "--builder-tpu-type=v5litepod-8", "--docker-image=i", f"--config={CONFIG}",
      "--workdir=gs://B/x"], "not a valid gs://"),
    (["vertex", "--region=us-central1", "--image=i", f"--config={CONFIG}",
      f"--workdir={WORKDIR}", "--replica-count=2"], "only 1 machine per job"),
    (["vertex", "--region=us-central1-a", "--image=i", f"--config={CONFIG}",
      f"--workdir={WORKDIR}"], "not a region"),
    (["vertex", "--region=us-central1", "--image=i", f"--config={CONFIG}",
      f"--workdir={WORKDIR}", "--machine-type=n1-standard-4"], "machine-type='n1-standard-4'"),
])
def test_validation_errors(argv, message, tmp_path):
  if argv[0] == "vertex":
    argv = argv + [f"--out-dir={tmp_path}"]
  rc, out, err, calls = run_main(["--dry-run", *argv])
  assert rc == 2 and not out and not calls
  assert err.startswith("launch error: ") and message in err, err


def test_missing_subcommand_is_argparse_error():
  with pytest.raises(SystemExit) as e:
    launch.build_parser(env={}).parse_args(["tpu-vm"])
  assert e.value.code == 2


# ---- tpu-vm ---------------------------------------------------------------------------------


def test_tpu_vm_create_queued_delete():
  assert commands(["tpu-vm", "create", *TPU, "--accelerator-type=v4-32", "--spot",
                   "--project=my-project"]) == [[
                       "gcloud", "compute", "tpus", "tpu-vm", "create", "realm-v4",
                       "--zone=us-central2-b", "--project=my-project",
                       "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]]
  assert commands(["tpu-vm", "queued-resource", *TPU, "--accelerator-type=v5litepod-64",
                   "--runtime-version=v2-alpha-tpuv5-lite", "--preemptible"]) == [[
                       "gcloud", "compute", "tpus", "queued-resources", "create", "realm-v4",
                       "--node-id=realm-v4", "--zone=us-central2-b",
                       "--accelerator-type=v5litepod-64",
                       "--runtime-version=v2-alpha-tpuv5-lite", "--preemptible"]]
  assert commands(["tpu-vm", "delete", *TPU]) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "realm-v4", "--zone=us-central2-b",
      "--quiet"]]


def test_tpu_vm_scp_and_setup():
  assert commands(["tpu-vm", "scp", *TPU, "--tmp-dir=/tmp/x"]) == [
      ["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", "/tmp/x/realm_jax.tar.gz", "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/x/realm_jax.tar.gz",
       "realm-v4:~/realm_jax.tar.gz", "--zone=us-central2-b", "--worker=all"]]
  [ssh] = commands(["tpu-vm", "setup", *TPU])
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "realm-v4",
                     "--zone=us-central2-b", "--worker=all"]
  script = ssh[8][len("--command="):]
  assert "tar -xzf ~/realm_jax.tar.gz -C ~/realm_jax" in script
  assert "[ -f constraints.txt ] && constraints='-c constraints.txt'" in script
  assert ".venv/bin/pip install -q $constraints -e '.[tpu,gcs]'" in script
  [ssh] = commands(["tpu-vm", "setup", *TPU, "--repo-url=https://example.com/r.git",
                    "--ref=v1", "--extras=tpu"])
  script = ssh[8]
  assert "git clone -q https://example.com/r.git ~/realm_jax" in script
  assert "checkout -q v1" in script and "'.[tpu]'" in script
  subprocess.run(["bash", "-n", "-c", script[len("--command="):]], check=True)  # parses


def test_tpu_vm_train_command():
  [ssh] = commands(["tpu-vm", "train", *TPU, "--accelerator-type=v4-32", f"--config={CONFIG}",
                    f"--workdir={WORKDIR}/", "--set", "train.batch_size=64",
                    "--restart-on-preemption=5"])
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "realm-v4",
                     "--zone=us-central2-b", "--worker=all"]
  command = ssh[8][len("--command="):]
  assert command.startswith("cd ~/realm_jax && mkdir -p ~/realm_jax_logs && nohup bash ")
  assert command.endswith(" > ~/realm_jax_logs/train.log 2>&1 < /dev/null &")
  subprocess.run(["bash", "-n", "-c", command], check=True)
  loop, python = remote_python(ssh)
  assert loop[:7] == ["bash", "launch/run_loop.sh", "train", "6", "30", "--",
                      ".venv/bin/python"]
  assert python == [".venv/bin/python", "-c", PRELUDE, "--mode=train", f"--config={CONFIG}",
                    "--config.train.batch_size=64", f"--workdir={WORKDIR}", "--distributed"]


def test_tpu_vm_builder_single_host_and_plain():
  [ssh] = commands(["tpu-vm", "index-builder", "--name=realm-builder", "--zone=us-central2-b",
                    "--accelerator-type=v4-8", f"--workdir={WORKDIR}", "--max-builds=3",
                    "--no-sigterm-as-interrupt"])
  assert ssh[5] == "realm-builder"
  loop, python = remote_python(ssh)
  assert loop[2:5] == ["index_builder", "1", "30"]
  # One host: no --distributed; no --config: the builder reads <workdir>/config.json.
  assert python == [".venv/bin/python", "-m", "realm_jax.main", "--mode=index_builder",
                    f"--workdir={WORKDIR}", "--max_builds=3"]
  assert "~/realm_jax_logs/index_builder.log" in ssh[8]


def test_tpu_vm_logs_kill():
  [ssh] = commands(["tpu-vm", "logs", *TPU, "--follow", "--role=index-builder"])
  assert ssh[7:] == ["--worker=0", "--command=tail -n 100 -F ~/realm_jax_logs/index_builder.log"]
  [ssh] = commands(["tpu-vm", "kill", *TPU])
  assert ssh[7] == "--worker=all"
  assert ssh[8].startswith("--command=touch ~/realm_jax_logs/train.stop; "
                           "[ -f ~/realm_jax_logs/train.pid ] && kill -TERM ")


def test_env_defaults_and_flags_win():
  env = {"TPU_NAME": "from-env", "ZONE": "europe-west4-a", "ACCELERATOR_TYPE": "v5litepod-16",
         "PROJECT": "p"}
  args = launch.build_parser(env=env).parse_args(["tpu-vm", "create", "--spot"])
  assert launch.commands_for(args)[0][5:9] == [
      "from-env", "--zone=europe-west4-a", "--project=p", "--accelerator-type=v5litepod-16"]
  args = launch.build_parser(env=env).parse_args(["tpu-vm", "create", "--name=flag"])
  assert launch.commands_for(args)[0][5] == "flag"


def test_dry_run_prints_and_runs_nothing():
  argv = ["tpu-vm", "scp", *TPU]
  rc, out, _, calls = run_main(["--dry-run", *argv])
  assert rc == 0 and not calls
  lines = out.splitlines()
  assert len(lines) == 2 and all(line.startswith("(dry run) ") for line in lines)
  assert shlex.split(lines[1][len("(dry run) "):]) == commands(argv)[1]
  # Without --dry-run: each runs in order (here a fake runner), printed with "+ ".
  rc, out, _, calls = run_main(argv)
  assert rc == 0 and calls == commands(argv)
  assert out.startswith("+ git -C ")
  # The first failure stops the rest.
  got = []
  rc = launch.main(argv, env={}, out=io.StringIO(), runner=lambda a: got.append(a) or 3)
  assert rc == 3 and len(got) == 1


# ---- xpk ------------------------------------------------------------------------------------

XPK = ["xpk", "--cluster=realm-cluster", "--zone=us-west4-a", "--project=my-project",
       "--tpu-type=v5litepod-64", "--builder-tpu-type=v5litepod-8",
       "--docker-image=gcr.io/my-project/realm_jax:v1", f"--config={CONFIG}",
       f"--workdir={WORKDIR}"]


def xpk_python(argv):
  command = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
  return shlex.split(command)


def test_xpk_two_workloads():
  train, builder = commands(XPK)
  assert train == [
      "xpk", "workload", "create", "--cluster=realm-cluster", "--workload=realm-train",
      "--tpu-type=v5litepod-64", "--num-slices=1",
      "--docker-image=gcr.io/my-project/realm_jax:v1",
      "--command=" + shlex.join(["python", "-c", PRELUDE, "--mode=train", f"--config={CONFIG}",
                                 f"--workdir={WORKDIR}", "--distributed",
                                 "--preempted_exit_code=42"]),
      "--zone=us-west4-a", "--project=my-project", "--max-restarts=10",
      "--termination-grace-period-seconds=300", "--priority=medium"]
  assert builder[4:7] == ["--workload=realm-builder", "--tpu-type=v5litepod-8", "--num-slices=1"]
  # Same config and workdir; the builder is 2 pods under xpk, hence --distributed.
  assert xpk_python(builder) == ["python", "-c", PRELUDE, "--mode=index_builder",
                                 f"--config={CONFIG}", f"--workdir={WORKDIR}", "--distributed",
                                 "--preempted_exit_code=42"]
  [only] = commands(XPK + ["--only=builder", "--spot", "--xpk-dry-run", "--manifest-dir=/m"])
  assert only[4] == "--workload=realm-builder"
  assert only[-4:] == ["--spot", "--dry-run", "--skip-validation",
                       "--output-manifest-file=/m/realm-builder.yaml"]


def _xpk_binary():
  for path in (os.environ.get("XPK_BIN"), shutil.which("xpk"), "/tmp/xpkenv/bin/xpk"):
    if path and os.path.exists(path):
      return path
  return None


def test_xpk_dry_run_matches_golden(tmp_path):
  """The real xpk (its own --dry-run, offline) writes the golden JobSets of launch/golden."""
  xpk = _xpk_binary()
  if xpk is None:
    pytest.skip("xpk not installed (python3.11 -m venv /tmp/xpkenv && /tmp/xpkenv/bin/pip "
                "install xpk, or XPK_BIN=...)")
  version = subprocess.run([xpk, "version"], capture_output=True, text=True, timeout=60)
  if "1.16.0" not in version.stdout + version.stderr:
    pytest.skip(f"golden files are from xpk 1.16.0, found: {version.stdout.strip()}")
  home = tmp_path / "home"
  home.mkdir()
  env = dict(os.environ, HOME=str(home), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
             CLOUDSDK_CORE_DISABLE_PROMPTS="1")
  procs = []
  for argv in commands(XPK + ["--xpk-dry-run", f"--manifest-dir={tmp_path}"]):
    procs.append(subprocess.Popen([xpk, *argv[1:]], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  for p in procs:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-2000:]
    assert "Exiting XPK cleanly" in out
  for workload in ("realm-train", "realm-builder"):
    got = (tmp_path / f"{workload}.yaml").read_text()
    want = open(os.path.join(ROOT, "launch", "golden", f"xpk_{workload}.yaml")).read()
    assert got == want, workload
  builder = (tmp_path / "realm-builder.yaml").read_text()
  assert re.search(r"parallelism: 2\b", builder)  # v5litepod-8 = 2 pods: --distributed above


# ---- vertex ---------------------------------------------------------------------------------


def test_vertex_jobs(tmp_path):
  argv = ["vertex", "--region=us-central1", "--project=my-project", "--image=img:v1",
          f"--config={CONFIG}", f"--workdir={WORKDIR}", f"--out-dir={tmp_path}", "--spot",
          "--builder-machine-type=ct5lp-hightpu-4t"]
  rc, out, _, calls = run_main(["--dry-run", *argv])
  assert rc == 0 and not calls
  cmds = commands(argv)
  assert cmds == [
      ["gcloud", "ai", "custom-jobs", "create", "--region=us-central1", "--project=my-project",
       "--display-name=realm-trainer", f"--config={tmp_path}/trainer.yaml"],
      ["gcloud", "ai", "custom-jobs", "create", "--region=us-central1", "--project=my-project",
       "--display-name=realm-builder", f"--config={tmp_path}/builder.yaml"]]
  yaml = pytest.importorskip("yaml")
  trainer = yaml.safe_load((tmp_path / "trainer.yaml").read_text())
  builder = yaml.safe_load((tmp_path / "builder.yaml").read_text())
  [pool] = trainer["workerPoolSpecs"]
  assert pool["machineSpec"] == {"machineType": "a2-highgpu-8g",
                                 "acceleratorType": "NVIDIA_TESLA_A100", "acceleratorCount": 8}
  assert pool["replicaCount"] == 1
  assert pool["containerSpec"] == {
      "imageUri": "img:v1", "command": ["python", "-c", PRELUDE],
      "args": ["--mode=train", f"--config={CONFIG}", f"--workdir={WORKDIR}"]}
  assert trainer["scheduling"] == {"restartJobOnWorkerRestart": False, "strategy": "SPOT"}
  [pool] = builder["workerPoolSpecs"]
  assert pool["machineSpec"] == {"machineType": "ct5lp-hightpu-4t", "tpuTopology": "2x2"}
  assert pool["containerSpec"]["args"] == ["--mode=index_builder", f"--config={CONFIG}",
                                           f"--workdir={WORKDIR}"]
  _, specs = launch.vertex_commands(launch.build_parser(env={}).parse_args(argv), write=False)
  assert yaml.safe_load(launch.to_yaml(specs[f"{tmp_path}/trainer.yaml"])) == trainer


# ---- the remote command is the project's real CLI -------------------------------------------


def _all_python_argvs(tmp_path):
  argvs = []
  for role in ("train", "index-builder"):
    for accel in ("v4-32", "v4-8"):
      [ssh] = commands(["tpu-vm", role, *TPU, f"--accelerator-type={accel}",
                        f"--config={CONFIG}", f"--workdir={WORKDIR}", "--force",
                        "--max-builds=2", "--set", "train.batch_size=64"])
      argvs.append(remote_python(ssh)[1])
  argvs += [xpk_python(a) for a in commands(XPK + ["--set", "train.batch_size=64"])]
  _, specs = launch.vertex_commands(launch.build_parser(env={}).parse_args(
      ["vertex", "--region=us-central1", "--image=i", f"--config={CONFIG}",
       f"--workdir={WORKDIR}", f"--out-dir={tmp_path}"]), write=False)
  for spec in specs.values():
    container = spec["workerPoolSpecs"][0]["containerSpec"]
    argvs.append(container["command"] + container["args"])
  return argvs


def test_remote_flags_are_the_clis(tmp_path):
  """Every flag the launchers pass is one `python -m realm_jax.main --helpfull` lists."""
  helpfull = subprocess.run([sys.executable, "-m", "realm_jax.main", "--helpfull"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
  known = set(re.findall(r"^\s+--(?:\[no\])?([a-z_]+)", helpfull.stdout, re.M))
  assert {"mode", "config", "workdir", "distributed", "max_builds", "force",
          "preempted_exit_code"} <= known
  seen = set()
  for argv in _all_python_argvs(tmp_path):
    assert argv[1:3] in (["-c", PRELUDE], ["-m", "realm_jax.main"])
    for flag in argv[3:]:
      name = flag[2:].split("=", 1)[0]
      name = "config" if name.startswith("config.") else name
      assert name in known, flag
      seen.add(name)
  assert seen == {"mode", "config", "workdir", "distributed", "max_builds", "force",
                  "preempted_exit_code"}


def test_prelude_runs_the_real_cli():
  """The SIGTERM prelude runs realm_jax.main with the flags untouched (print_config checks the
  config and the override), exit 0."""
  argv = commands(["tpu-vm", "train", *TPU, "--accelerator-type=v4-8", f"--config={CONFIG}",
                   f"--workdir={WORKDIR}", "--set", "train.batch_size=64"])[0]
  python = remote_python(argv)[1]
  flags = [f for f in python[3:] if f.startswith("--config")] + ["--mode=print_config"]
  proc = subprocess.run([sys.executable, "-c", PRELUDE, *flags], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert re.search(r"^train\.batch_size = 64\b", proc.stdout, re.M)


# ---- run_loop.sh: restarts and SIGTERM ------------------------------------------------------

FAKE = """
import os, sys, time
count = os.path.join(os.environ["COUNT_DIR"], "runs")
n = int(open(count).read()) + 1 if os.path.exists(count) else 1
open(count, "w").write(str(n))
print("run", n, sys.argv[1:], flush=True)
if n < int(os.environ["FAIL_RUNS"]) + 1:
  sys.exit(1)  # a crash: retried
try:
  time.sleep(float(os.environ["SLEEP"]))
except KeyboardInterrupt:  # what realm_jax/train/loop.py catches to save a checkpoint
  print("saving", flush=True)
  time.sleep(0.5)  # a second SIGTERM here must not interrupt the save
  print("saved", flush=True)
  sys.exit(130)
"""


def _loop(tmp_path, fail_runs, sleep, attempts=3):
  (tmp_path / "fake_trainer.py").write_text(FAKE)
  env = dict(os.environ, PYTHONPATH=str(tmp_path), COUNT_DIR=str(tmp_path),
             FAIL_RUNS=str(fail_runs), SLEEP=str(sleep), REALM_LOG_DIR=str(tmp_path / "logs"))
  argv = launch.loop_argv("train", launch.python_argv(sys.executable, ["--mode=train"],
                                                      module="fake_trainer"), attempts, 0)
  return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_run_loop_retries_crashes_until_success(tmp_path):
  proc = _loop(tmp_path, fail_runs=2, sleep=0)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  assert out.count("exited 1") == 2 and "attempt 3 exited 0" in out
  assert (tmp_path / "runs").read_text() == "3"
  assert not (tmp_path / "logs" / "train.pid").exists()
  (tmp_path / "again").mkdir()
  proc = _loop(tmp_path / "again", fail_runs=5, sleep=0, attempts=2)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 1 and "attempt 2 exited 1" in out and "attempt 3" not in out


def test_run_loop_sigterm_saves_and_does_not_restart(tmp_path):
  proc = _loop(tmp_path, fail_runs=0, sleep=60)
  pid_file = tmp_path / "logs" / "train.pid"
  deadline = time.time() + 30
  while not (pid_file.exists() and (tmp_path / "runs").exists()) and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.3)  # the prelude's handler is installed before the module runs
  os.kill(proc.pid, signal.SIGTERM)  # the loop, as a preemption would
  time.sleep(0.2)
  os.kill(int(pid_file.read_text()), signal.SIGTERM)  # and the trainer itself, mid-save
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 130, out
  assert "saving" in out and "saved" in out and "attempt 1 exited 130" in out
  assert "attempt 2" not in out and (tmp_path / "logs" / "train.stop").exists()


# ---- gcloud parses every command line (no account: stops after parsing) ---------------------


def test_gcloud_parses_every_command(tmp_path):
  gcloud = shutil.which("gcloud")
  if gcloud is None:
    pytest.skip("gcloud not installed")
  argvs = [
      commands(["tpu-vm", "create", *TPU, "--accelerator-type=v4-32", "--spot",
                "--project=p"])[0],
      commands(["tpu-vm", "queued-resource", *TPU, "--accelerator-type=v4-32", "--spot",
                "--project=p"])[0],
      commands(["tpu-vm", "scp", *TPU, "--project=p"])[1],
      commands(["tpu-vm", "train", *TPU, "--accelerator-type=v4-32", f"--config={CONFIG}",
                f"--workdir={WORKDIR}", "--project=p"])[0],
      commands(["tpu-vm", "delete", *TPU, "--project=p"])[0],
      commands(["vertex", "--region=us-central1", "--image=i", f"--config={CONFIG}",
                f"--workdir={WORKDIR}", f"--out-dir={tmp_path}", "--project=p"])[0],
  ]
  home = tmp_path / "home"
  home.mkdir()
  env = dict(os.environ, HOME=str(home), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
             CLOUDSDK_CORE_DISABLE_PROMPTS="1")
  env.pop("CLOUDSDK_CORE_ACCOUNT", None)
  procs = [subprocess.Popen([gcloud, *a[1:]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for a in argvs + [argvs[0] + ["--no-such-flag"]]]
  bogus = procs.pop()
  out, _ = bogus.communicate(timeout=120)
  assert bogus.returncode == 2 and "unrecognized arguments" in out  # the control
  for argv, proc in zip(argvs, procs):
    out, _ = proc.communicate(timeout=120)
    # Parsed: the only complaint is the missing account (exit 1), never a usage error (2).
    assert proc.returncode == 1 and "active account" in out, (argv[:6], out[-1500:])


def test_shell_wrapper_dry_run():
  env = dict(os.environ, ENV_FILE=os.path.join(ROOT, "launch", "env.sh"), ZONE="us-central2-b",
             TPU_NAME="from-env", ACCELERATOR_TYPE="v4-8", PROJECT="",
             RUNTIME_VERSION="")
  proc = subprocess.run(["bash", "launch/tpu_vm.sh", "--dry-run", "create"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == ("(dry run) gcloud compute tpus tpu-vm create from-env "
                                 "--zone=us-central2-b --accelerator-type=v4-8 "
                                 "--version=tpu-ubuntu2204-base")
