"""Every test process sees 8 fake CPU devices, so sharding is tested without accelerators."""

import os
import pathlib

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
