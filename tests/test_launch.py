"""launch/: the shell scripts against stub gcloud/srun/scontrol commands (the notebook: tests/test_notebook.py)."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_vm.sh", "tpu_pod.sh", "slurm_gpu.sbatch"]

# Fake gcloud: logs each call to $STUB/calls. The VM / queued resource state lives in $STUB/state (absent = no
# resource; it turns ACTIVE once $STUB/polls_until_active counts down); a train command fails while
# $STUB/failures counts down, leaving the state in $STUB/failure_state ('gone': no resource).
GCLOUD_STUB = r"""#!/bin/bash
cd "$STUB"
echo "$*" >> calls
case "$*" in
  *" describe "*)
    [[ -f state ]] || exit 1
    if [[ -f polls_until_active ]]; then
      n=$(cat polls_until_active)
      echo $(( n - 1 )) > polls_until_active
      (( n > 0 )) || echo ACTIVE > state
    fi
    cat state ;;
  *"tpu-vm create "*|*"queued-resources create "*) echo "${CREATED_STATE:-ACTIVE}" > state ;;
  *"queued-resources delete "*) [[ -f state ]] || exit 1; rm state ;;
  *" scp "*) tar -tzf "$5" > copied ;;
  *"gptjax.main"*)
    n=$(cat failures 2>/dev/null || echo 0)
    if (( n > 0 )); then
      echo $(( n - 1 )) > failures
      if [[ "$(cat failure_state 2>/dev/null)" == gone ]]; then rm -f state
      elif [[ -f failure_state ]]; then cp failure_state state; fi
      exit 1
    fi ;;
esac
exit 0
"""


@pytest.fixture
def bash():
  path = shutil.which("bash")
  if path is None:
    pytest.skip("bash is not installed: the launch scripts are bash scripts")
  return path


@pytest.fixture
def stub(tmp_path):
  """A directory with the fake gcloud; the returned env runs the scripts against it."""
  gcloud = tmp_path / "gcloud"
  gcloud.write_text(GCLOUD_STUB)
  gcloud.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "SLURM_"))}
  env.update(GCLOUD=str(gcloud), STUB=str(tmp_path), POLL_SECONDS="0", USER="tester")
  return tmp_path, env


def _run(bash, script, *args, env=None):
  return subprocess.run([bash, str(LAUNCH / script), *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=60)


def _calls(stub_dir):
  return (stub_dir / "calls").read_text().splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_explain_themselves(bash, script):
  assert subprocess.run([bash, "-n", str(LAUNCH / script)]).returncode == 0
  result = _run(bash, script, "--help")
  assert result.returncode == 0 and "Usage:" in result.stdout and "--dry-run" in result.stdout
  result = _run(bash, script, "--no-such-option", "--workdir=gs://b/r")
  assert result.returncode != 0 and "unknown option --no-such-option" in result.stderr


def test_tpu_vm_dry_run_prints_queued_resource_copy_install_run(bash, stub):
  _, env = stub
  env.update(TPU_NAME="vm1", TPU_ZONE="us-central2-b", TPU_ACCELERATOR="v4-8")
  result = _run(bash, "tpu_vm.sh", "--dry-run", "--config=configs/quickstart.py", "--workdir=runs/q", "--",
                "--config.train.steps=5", "--config.data.path=corpus/*.txt", env=env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  gcloud = env["GCLOUD"]
  assert lines[0] == (f"{gcloud} compute tpus queued-resources describe vm1 --zone=us-central2-b "
                      "'--format=value(state.state)'")
  assert lines[1] == (f"{gcloud} compute tpus queued-resources create vm1 --node-id=vm1 --zone=us-central2-b "
                      "--accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base")
  assert lines[2].startswith("# then the describe command")
  assert lines[3].startswith(f"git -C {ROOT} ls-files")
  assert re.fullmatch(rf"{gcloud} compute tpus tpu-vm scp \S+\.tar\.gz vm1:gptjax-src\.tar\.gz "
                      r"--zone=us-central2-b --worker=all", lines[4])
  install, train = lines[5], lines[6]
  assert install.startswith(f"{gcloud} compute tpus tpu-vm ssh vm1 --zone=us-central2-b --worker=all '--command=")
  assert "uv venv --python 3.11" in install and "gcsfuse" not in install
  # The tested versions, with the extras that gs:// workdirs and data.path='hf:...' need.
  assert "-c ~/gptjax-src/constraints.txt ~/gptjax-src'\\''[tpu,gcs,hf]'\\''" in install
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  assert {"tpu", "gcs", "hf"} <= set(extras) and (ROOT / "constraints.txt").is_file()
  assert train.endswith("~/gptjax-venv/bin/python -m gptjax.main --config=configs/quickstart.py "
                        r"--workdir=runs/q --config.train.steps=5 --config.data.path=corpus/\*.txt'")
  assert not any(gcloud in line for line in lines[7:])  # dry run: nothing else, and nothing ran
  assert not (stub[0] / "calls").exists()


def test_tpu_vm_reuses_an_active_vm_and_copies_the_checkout(bash, stub):
  stub_dir, env = stub
  (stub_dir / "state").write_text("ACTIVE\n")
  result = _run(bash, "tpu_vm.sh", "--name=vm1", "--config=configs/quickstart.py", env=env)
  assert result.returncode == 0, result.stderr
  calls = _calls(stub_dir)
  assert not any(" create " in c for c in calls)
  assert [c.split()[3] for c in calls] == ["describe", "scp", "ssh", "ssh"]
  copied = set((stub_dir / "copied").read_text().split())
  assert {"pyproject.toml", "constraints.txt", "gptjax/main.py", "configs/quickstart.py", "launch/tpu_vm.sh"} <= copied
  assert "gptjax.main --config=configs/quickstart.py" in calls[-1]
  assert "queued-resources delete vm1" in result.stderr  # how to stop paying


def test_tpu_vm_replaces_a_preempted_vm(bash, stub):
  stub_dir, env = stub
  (stub_dir / "state").write_text("SUSPENDED\n")
  result = _run(bash, "tpu_vm.sh", "--name=vm1", "--workdir=gs://bkt/run", env=env)
  assert result.returncode == 0, result.stderr
  assert "queued resource vm1 is SUSPENDED: replacing it" in result.stderr
  ops = [c.split()[3] for c in _calls(stub_dir) if c.split()[3] in ("create", "delete", "ssh")]
  assert ops == ["delete", "create", "ssh", "ssh"]
  assert _calls(stub_dir)[-1].endswith("--workdir=gs://bkt/run")  # the run reads and writes gs:// itself


@pytest.mark.parametrize("accelerator", ["v4-16", "v5p-16", "v5litepod-16", "v6e-16", "v5litepod-256"])
def test_tpu_vm_refuses_multi_host_types(bash, stub, accelerator):
  stub_dir, env = stub
  result = _run(bash, "tpu_vm.sh", f"--accelerator={accelerator}", "--workdir=gs://bkt/run", env=env)
  assert result.returncode != 0
  assert f"--accelerator={accelerator} spans several hosts" in result.stderr
  assert "launch/tpu_pod.sh" in result.stderr and "--distributed" in result.stderr
  assert not (stub_dir / "calls").exists()


@pytest.mark.parametrize("accelerator", ["v5litepod-1", "v5litepod-8", "v6e-8", "v4-8", "v5p-8"])
def test_tpu_vm_takes_single_host_types(bash, stub, accelerator):
  _, env = stub
  result = _run(bash, "tpu_vm.sh", "--dry-run", f"--accelerator={accelerator}", env=env)
  assert result.returncode == 0, result.stderr
  assert f"--accelerator-type={accelerator}" in result.stdout


def test_tpu_pod_dry_run_runs_everything_on_all_workers(bash, stub):
  _, env = stub
  result = _run(bash, "tpu_pod.sh", "--dry-run", "--name=pod", "--zone=us-west4-a", "--accelerator=v5litepod-64",
                "--spot", "--project=proj", "--config=configs/gpt2_xl.py", "--workdir=gs://bkt/runs/xl", "--",
                "--config.model.dtype=bfloat16", env=env)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  gcloud = env["GCLOUD"]
  assert (f"{gcloud} compute tpus queued-resources create pod --node-id=pod --zone=us-west4-a --project=proj "
          "--accelerator-type=v5litepod-64 --runtime-version=v2-alpha-tpuv5-lite --spot") in out
  ssh = [line for line in out.splitlines() if " tpu-vm ssh " in line]
  assert len(ssh) == 2 and all("--worker=all" in line for line in ssh)
  assert "[tpu,gcs,hf]" in ssh[0] and "gcsfuse" not in ssh[0]
  assert ssh[1].endswith("-m gptjax.main --config=configs/gpt2_xl.py --workdir=gs://bkt/runs/xl "
                         "--distributed --config.model.dtype=bfloat16'")
  assert (ROOT / "configs/gpt2_xl.py").is_file()
  cli_source = (ROOT / "gptjax/cli.py").read_text()
  assert re.search(r'DEFINE_bool\("distributed"', cli_source)  # the flag the scripts and the messages name


def test_tpu_pod_mounts_the_bucket_with_gcsfuse_when_asked(bash, stub):
  _, env = stub
  result = _run(bash, "tpu_pod.sh", "--dry-run", "--gcsfuse", "--workdir=gs://bkt/runs/xl", env=env)
  assert result.returncode == 0, result.stderr
  install, train = [line for line in result.stdout.splitlines() if " tpu-vm ssh " in line]
  assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 bkt /mnt/gcs/bkt" in install
  assert "--workdir=/mnt/gcs/bkt/runs/xl --distributed" in train


def test_tpu_pod_needs_a_shared_workdir(bash, stub):
  _, env = stub
  result = _run(bash, "tpu_pod.sh", "--dry-run", "--workdir=runs/local", env=env)
  assert result.returncode != 0 and "gs://my-bucket" in result.stderr


@pytest.mark.parametrize("after_failure", ["SUSPENDED", "gone"])
def test_tpu_pod_recreates_a_preempted_resource_and_reruns(bash, stub, after_failure):
  stub_dir, env = stub
  (stub_dir / "failures").write_text("1")
  (stub_dir / "failure_state").write_text(after_failure)  # the first run ends with a Spot preemption
  result = _run(bash, "tpu_pod.sh", "--name=pod", "--workdir=gs://bkt/run", env=env)
  assert result.returncode == 0, result.stderr
  calls = _calls(stub_dir)
  train = [c for c in calls if "gptjax.main" in c]
  assert len(train) == 2 and all("--worker=all" in c for c in train)
  ops = [c.split()[2] + " " + c.split()[3] for c in calls if c.split()[3] in ("create", "delete")]
  deleted = ["queued-resources delete"] if after_failure == "SUSPENDED" else []
  assert ops == ["queued-resources create", *deleted, "queued-resources create"]
  assert "restart 1 of 5" in result.stderr


def test_tpu_pod_gives_up_after_max_restarts(bash, stub):
  stub_dir, env = stub
  (stub_dir / "failures").write_text("100")  # every run fails, the resource stays ACTIVE
  result = _run(bash, "tpu_pod.sh", "--name=pod", "--workdir=gs://bkt/run", "--max-restarts=2", env=env)
  assert result.returncode != 0
  assert "giving up after 2 restarts" in result.stderr
  calls = _calls(stub_dir)
  assert sum("gptjax.main" in c for c in calls) == 3  # the first run and two restarts
  assert sum(" create " in c for c in calls) == 3 and sum(" delete " in c for c in calls) == 2
  assert sum(" scp " in c for c in calls) == 3  # fresh hosts get a fresh copy each time


def test_tpu_pod_waits_until_active(bash, stub):
  stub_dir, env = stub
  env["CREATED_STATE"] = "WAITING_FOR_RESOURCES"
  (stub_dir / "polls_until_active").write_text("2")
  result = _run(bash, "tpu_pod.sh", "--name=pod", "--workdir=gs://bkt/run", env=env)
  assert result.returncode == 0, result.stderr
  assert "waiting for pod to be ACTIVE (WAITING_FOR_RESOURCES)" in result.stderr
  assert sum("gptjax.main" in c for c in _calls(stub_dir)) == 1


def _slurm_env(stub_dir, env):
  scontrol = stub_dir / "scontrol"
  scontrol.write_text('#!/bin/bash\necho "scontrol $*" >> "$STUB/calls"\n'
                      '[[ $1 == show ]] && printf "gpu-a1\\ngpu-a2\\ngpu-a3\\ngpu-a4\\n"\nexit 0\n')
  scontrol.chmod(0o755)
  env.update(SCONTROL=str(scontrol), SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="gpu-a[1-4]", SLURM_NTASKS="4",
             SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(ROOT))
  env.pop("XLA_FLAGS", None)  # the tests' conftest sets one; the script's default is what is checked
  return env


def test_slurm_dry_run_prints_one_process_per_node(bash, stub):
  stub_dir, env = stub
  env = _slurm_env(stub_dir, env)
  result = _run(bash, "slurm_gpu.sbatch", "--dry-run", "--config=configs/gpt2_medium.py", "--workdir=/shared/m",
                "--", "--config.model.dtype=bfloat16", env=env)
  assert result.returncode == 0, result.stderr
  exports, srun = result.stdout.splitlines()
  assert "JAX_LOCAL_DEVICE_IDS='0,1,2,3,4,5,6,7'" in exports
  assert "XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true'" in exports
  assert srun.startswith("'srun' '--ntasks-per-node=1' '--kill-on-bad-exit=1' 'bash' '-c'")
  port = 1234 % 4096 + 61440
  for arg in ["--config=configs/gpt2_medium.py", "--workdir=/shared/m", f"--coordinator_address=gpu-a1:{port}",
              "--num_processes=4", "--config.model.dtype=bfloat16"]:
    assert f"'{arg}'" in srun
  assert '--process_id="$SLURM_PROCID"' in srun
  cli_source = (ROOT / "gptjax/cli.py").read_text()
  for flag in ("coordinator_address", "num_processes", "process_id"):  # the script passes gptjax.cli's flags
    assert re.search(rf'DEFINE_\w+\("{flag}"', cli_source), flag


def test_slurm_xla_flags_are_known_to_xla(bash, stub):
  stub_dir, env = stub
  env = _slurm_env(stub_dir, env)
  exports = _run(bash, "slurm_gpu.sbatch", "--dry-run", "--workdir=/w", env=env).stdout.splitlines()[0]
  xla_flags = re.search(r"XLA_FLAGS='([^']*)'", exports).group(1)
  # XLA aborts at start-up on a flag it does not know, on any backend.
  probe = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(jnp.ones(2).sum())"],
                         env={**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120)
  assert probe.returncode == 0, probe.stderr[-2000:]


def test_slurm_checkpoints_and_requeues_before_the_time_limit(bash, stub):
  stub_dir, env = stub
  env = _slurm_env(stub_dir, env)
  # Fake srun: drops its own options and runs the command as task 1 would; fake python logs its arguments and
  # exits 0 on SIGTERM, like the training loop after its checkpoint.
  (stub_dir / "srun").write_text('#!/bin/bash\necho "srun $*" >> "$STUB/calls"\n'
                                 'while [[ $1 == --* ]]; do shift; done\nSLURM_PROCID=1 exec "$@"\n')
  (stub_dir / "python").write_text('#!/bin/bash\necho "python $*" >> "$STUB/calls"\n'
                                   'trap \'echo "python: SIGTERM" >> "$STUB/calls"; exit 0\' TERM\n'
                                   'while :; do sleep 0.05; done\n')
  for name in ("srun", "python"):
    (stub_dir / name).chmod(0o755)
  env.update(SRUN=str(stub_dir / "srun"))
  job = subprocess.Popen([bash, str(LAUNCH / "slurm_gpu.sbatch"), "--workdir=/shared/w",
                          f"--python={stub_dir / 'python'}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  calls = stub_dir / "calls"
  deadline = time.time() + 30
  while not (calls.exists() and "python -m gptjax.main" in calls.read_text()):
    assert time.time() < deadline and job.poll() is None, job.communicate()[0]
    time.sleep(0.05)
  job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers
  out, _ = job.communicate(timeout=30)
  assert job.returncode == 0, out
  log = calls.read_text().splitlines()
  run = next(line for line in log if line.startswith("python "))
  assert run.startswith("python -m gptjax.main --config=configs/gpt2_small.py --workdir=/shared/w")
  assert run.endswith("--num_processes=4 --process_id=1")
  assert log[-2:] == ["python: SIGTERM", "scontrol requeue 1234"]
  assert "time limit in 5 minutes" in out


def test_slurm_needs_a_job_unless_dry_run(bash, stub):
  _, env = stub
  result = _run(bash, "slurm_gpu.sbatch", "--workdir=/w", env=env)
  assert result.returncode != 0 and "not inside a SLURM job" in result.stderr
