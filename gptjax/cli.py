"""What the command-line entry points share: the --config/--workdir pair, quiet library logs, one-line errors."""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gptjax import errors, paths, tpu


def define_config_flags(workdir_help: str):
  """Defines --config (a configs/*.py file), --workdir and the multi-process flags; returns config and workdir."""
  config = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt2_small.py.",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, f"{workdir_help}; default runs/<config name>.")
  flags.mark_flag_as_required("config")
  define_distributed_flags()
  return config, workdir


def define_distributed_flags() -> None:
  """The flags `initialize_distributed` reads."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters JAX does not detect "
                      "(TPU pods and SLURM are detected without it).")
  flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize; default: when a coordinator is given "
                    "or a TPU pod / SLURM job is detected.")


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
  """--workdir, or runs/<config file name> when it is not given; StorageError if its storage is unusable."""
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  path = workdir_flag.value or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])
  try:
    paths.check(path)  # before any work: a URL that cannot be served never becomes a local folder
  except paths.StorageError as e:
    raise paths.StorageError(f"--workdir={path}: {e}") from e
  return path


def quiet_libraries() -> None:
  """Orbax logs every save at INFO, which absl shows by default under app.run; --verbosity=0 brings it back. On a
  machine without a TPU, libtpu (the dev and tpu extras) is told so before JAX starts, instead of logging errors."""
  if not any(arg.split("=")[0] in ("--verbosity", "-v", "--v") for arg in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
  if not tpu.attached():
    tpu.quiet_libtpu()


def run(main) -> None:
  """absl's app.run(main), where an error the user can fix (errors.UserError) prints as one `error: ...` line on
  stderr and exits with status 2, and Ctrl-C exits at once with 130; bugs keep their traceback, and --verbosity=1
  shows it for these too."""
  def main_with_one_line_errors(argv):
    try:
      return main(argv)
    except (errors.UserError, KeyboardInterrupt) as e:
      if flags.FLAGS.verbosity >= 1:
        raise
      message, status = (f"error: {e}", 2) if isinstance(e, errors.UserError) else ("aborted by Ctrl-C", 130)
    # Out of the except block, the traceback is gone and with it the frames' objects: Grain iterators stop their
    # worker processes now.
    print(message, file=sys.stderr, flush=True)
    jax = sys.modules.get("jax")
    if status == 130 or (jax is not None and jax.distributed.is_initialized()):
      # An ordinary exit waits for the device to finish the step in flight (an hour for GPT-2 on a CPU) and, in a
      # multi-process job, up to 5 minutes at jax.distributed's shutdown barrier for the other processes, which never
      # reach it while they wait in a collective this process will not join (leaving ends them too: their runtime
      # sees this process gone).
      sys.stdout.flush()
      os._exit(status)
    sys.exit(status)
  app.run(main_with_one_line_errors)
