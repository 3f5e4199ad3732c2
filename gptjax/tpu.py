"""TPU slices without a TPU: accelerator types as users write them, the chips' figures, and compile-only devices.

`devices('v5e-8')` returns the 8 devices of a v5e slice as libtpu describes them on any machine (no TPU attached,
even under JAX_PLATFORMS=cpu). A mesh over them compiles programs with the real TPU compiler: `jit(f).lower(...)
.compile()` gives the TPU's own memory and cost analyses, and a program that would not fit in HBM fails to compile
as it would on the chip. That is how `python -m gptjax.plan --tpu=TYPE` plans a launch and how CI checks every
config's steps (tests/test_tpu_compile.py).
"""

import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re

from gptjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: dense bf16 peak and HBM bandwidth from the Cloud TPU documentation; HBM as the TPU compiler
  counts it (the 'available HBM' of its out-of-memory message, a little under the documented size)."""
  generation: str
  bf16_flops: float  # FLOP/s
  hbm_bytes: int
  hbm_bytes_per_s: float
  topology_prefix: str  # libtpu's name for the generation in a topology string, e.g. 'v5e:2x4'
  mesh_dims: int  # 2-D (v5e, v6e) or 3-D torus (v4, v5p)
  counts_cores: bool  # the accelerator type counts TensorCores (2 per chip, one megacore device per chip)
  device_kinds: tuple[str, ...]  # jax.Device.device_kind on the chip


GIB = 2**30
CHIPS = {  # documented HBM: v4 32 GiB, v5e 16 GB, v5p 95 GB, v6e 32 GB
    "v4": Chip("v4", 275e12, int(30.75 * GIB), 1.2e12, "v4", 3, counts_cores=True, device_kinds=("TPU v4",)),
    "v5e": Chip("v5e", 197e12, int(15.75 * GIB), 819e9, "v5e", 2, counts_cores=False,
                device_kinds=("TPU v5 lite", "TPU v5e")),
    "v5p": Chip("v5p", 459e12, int(95.74 * GIB), 2.765e12, "v5", 3, counts_cores=True,
                device_kinds=("TPU v5p", "TPU v5")),
    "v6e": Chip("v6e", 918e12, int(31.25 * GIB), 1.64e12, "v6e", 2, counts_cores=False,
                device_kinds=("TPU v6 lite", "TPU v6e")),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}  # gcloud's names for the same chips
EXTRA = 'pip install -e ".[tpu]" -c constraints.txt'


@dataclasses.dataclass(frozen=True)
class Slice:
  """An accelerator type: its chip, how many chips, and libtpu's topology for it."""
  accelerator: str
  chip: Chip
  chips: int
  topology: str  # e.g. 'v5e:2x4', 'v5:2x2x2'
  chips_per_host: tuple[int, int, int]


def parse(accelerator: str) -> Slice:
  """'v5e-8', 'v5litepod-8', 'v5p-64', 'v6e-16', 'v4-32' -> the slice; a type it cannot map is a UserError."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator.strip().lower())
  known = ", ".join(sorted(CHIPS) + sorted(ALIASES))
  if not match:
    raise UserError(f"--tpu={accelerator!r} is not an accelerator type: write GENERATION-N as for gcloud, e.g. "
                    f"v5e-1 (Colab), v5litepod-8, v5p-64, v6e-16 or v4-32 (generations: {known}).")
  generation, count = ALIASES.get(match[1], match[1]), int(match[2])
  if generation not in CHIPS:
    raise UserError(f"--tpu={accelerator}: unknown TPU generation {match[1]!r}; use one of {known}.")
  chip = CHIPS[generation]
  chips = count // 2 if chip.counts_cores else count
  unit = "TensorCores (2 per chip)" if chip.counts_cores else "chips"
  smallest = 4 if chip.mesh_dims == 3 else 1
  if chips < smallest or chips & (chips - 1) or (chip.counts_cores and count % 2):
    raise UserError(f"--tpu={accelerator}: {generation} slices count {unit} in powers of two from "
                    f"{smallest * (2 if chip.counts_cores else 1)}, e.g. {generation}-8.")
  shape = _torus_shape(chips, chip.mesh_dims)
  per_host = (1, 1, 1) if chips == 1 else (2, 2, 1)
  return Slice(accelerator, chip, chips, f"{chip.topology_prefix}:{'x'.join(map(str, shape))}", per_host)


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shapes Cloud TPU offers: 2-D grows x then y (1x1, 2x2, 2x4, 4x4, ...); 3-D starts at 2x2x1 and
  grows z, y, x in turn (2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
  if dims == 2:
    k = int(math.log2(chips))
    return (2 ** (k // 2), 2 ** (k - k // 2))
  shape = [2, 2, 1]
  axis = 2
  while math.prod(shape) < chips:
    shape[axis] *= 2
    axis = (axis - 1) % 3 if math.prod(shape) > 8 else axis
  return tuple(shape)


def chip_of(device_kind: str) -> Chip | None:
  """The chip a JAX device of this kind is, or None (not a TPU this table knows)."""
  return next((chip for chip in CHIPS.values() if device_kind.lower() in (k.lower() for k in chip.device_kinds)),
              None)


def available() -> bool:
  """Whether libtpu (the TPU compiler) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def attached() -> bool:
  """Whether this machine has TPU chips (their device files: /dev/accel* up to v5e, /dev/vfio on v5p and v6e)."""
  return bool(glob.glob("/dev/accel*")) or os.path.isdir("/dev/vfio")


def quiet_libtpu() -> None:
  """Where no TPU is attached (compile-only devices, a CPU or GPU machine with libtpu installed), libtpu would look
  for the TPU VM's metadata server and workers when JAX starts, and log errors and a trace for each: this tells it
  there is none to look for. Compiling claims no chip, so several processes (pytest-xdist workers) may load it."""
  for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-1"),
                      ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                      ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(name, value)


def libtpu_version() -> str:
  """The installed libtpu's version, for reports."""
  from importlib import metadata
  return metadata.version("libtpu")


def devices(slice_or_type):
  """The compile-only devices of a slice (one per chip; v4/v5p as megacore), on any machine with libtpu."""
  slice_ = parse(slice_or_type) if isinstance(slice_or_type, str) else slice_or_type
  if not available():
    raise UserError(f"--tpu={slice_.accelerator} compiles with the TPU compiler, which is not installed: {EXTRA} "
                    "(libtpu; it compiles for TPUs on a machine without one).")
  quiet_libtpu()
  return _topology_devices(slice_.topology, slice_.chips_per_host, slice_.chip.counts_cores)


@functools.lru_cache(maxsize=None)  # ~1 s each; a planner or a test module asks for the same slice many times
def _topology_devices(topology: str, chips_per_host, megacore: bool):
  from jax.experimental import topologies
  extra = {"chip_config_name": "megacore"} if megacore else {}
  return topologies.get_topology_desc(platform="tpu", topology_name=topology, chips_per_host_bounds=chips_per_host,
                                      **extra).devices
