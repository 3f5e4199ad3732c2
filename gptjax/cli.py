"""What the command-line entry points share: the --config/--workdir pair and quiet library logs."""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags


def define_config_flags(workdir_help: str):
  """Defines --config (a configs/*.py file), --workdir and the multi-process flags; returns config and workdir."""
  config = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt2_small.py.",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, f"{workdir_help}; default runs/<config name>.")
  flags.mark_flag_as_required("config")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters JAX does not detect "
                      "(TPU pods and SLURM are detected without it).")
  flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize; default: when a coordinator is given "
                    "or a TPU pod / SLURM job is detected.")
  return config, workdir


def initialize_distributed() -> None:
  """Joins the multi-controller job: explicit flags, or JAX's own detection on TPU pods and SLURM."""
  f = flags.FLAGS
  detected = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
  detected |= "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
  wanted = f.distributed if f.distributed is not None else bool(f.coordinator_address) or detected
  if not wanted:
    return
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes (tests)
  jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)


def workdir(workdir_flag) -> str:
  """--workdir, or runs/<config file name> when it is not given."""
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  return workdir_flag.value or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


def quiet_libraries() -> None:
  """Orbax logs every save at INFO, which absl shows by default under app.run; --verbosity=0 brings it back."""
  if not any(arg.split("=")[0] in ("--verbosity", "-v", "--v") for arg in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
