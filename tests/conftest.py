"""Every test process sees 8 fake CPU devices, so sharding is tested without accelerators.

`GPTJAX_TEST_DEVICES=1 python -m pytest` runs the suite on one device instead (tests marked `devices(n)` that need
more then skip), and XLA flags already in XLA_FLAGS (e.g. --xla_cpu_max_isa=AVX2) are kept: the suite must hold
under both, on every CPU family of our machine kind.
"""

import os
import pathlib
import tempfile

import pytest

TEST_DEVICES = int(os.environ.get("GPTJAX_TEST_DEVICES", "8"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={TEST_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One JAX compilation cache for every process of the suite (the xdist workers and the runs they start, which inherit
# the environment): the many end-to-end runs of the same tiny models compile each program once (a tiny run's
# subprocess: 19 s cold, 9 s warm). Keys hold the JAX version, flags and devices, so entries never go stale.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"gptjax-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
  config.addinivalue_line("markers", "devices(n): needs n (fake CPU) devices; skipped with fewer")


def pytest_collection_modifyitems(config, items):
  for item in items:
    marker = item.get_closest_marker("devices")
    if marker and marker.args[0] > TEST_DEVICES:
      item.add_marker(pytest.mark.skip(reason=f"needs {marker.args[0]} devices, GPTJAX_TEST_DEVICES={TEST_DEVICES}"))


@pytest.fixture
def shared_data() -> pathlib.Path:
  """../shared/data (real corpora); tests that need it skip in a user's clone without it."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} is absent (it ships only with the development workspace)")
  return SHARED_DATA


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A text file of 3000 ten-word lines over a 16-word vocabulary: enough for tiny end-to-end runs."""
  import numpy as np  # pylint: disable=import-outside-toplevel  # conftest sets XLA flags before numpy/jax load
  rng = np.random.RandomState(0)
  words = "the quick brown fox jumps over a lazy dog while cats sleep on warm mats".split()
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(3000)))
  return path
