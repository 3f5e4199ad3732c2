"""launch/colab_tpu.ipynb: its structure, its default source, its TPU runs' configs, and the notebook executed top to
bottom on CPU.

`notebook_tpu_configs()` gives the configs of the notebook's TPU runs (its `TPU_RUNS` cell) as `gptjax.main` parses
them, for tests/test_compile.py to compile for v5e-1.
"""

import json
import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_tpu.ipynb"


def _code_cells():
  nb = json.loads(NOTEBOOK.read_text())
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_nbformat_4_without_outputs():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert nb["metadata"]["accelerator"] == "TPU" and nb["metadata"]["kernelspec"]["name"] == "python3"
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
    assert isinstance(cell["metadata"], dict)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
      compile("".join(cell["source"]), "cell", "exec")  # plain Python: no !shell or %magic lines


def test_notebook_installs_from_the_repository_pyproject_names():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  repository = project["urls"]["Repository"]
  settings = _code_cells()[0]
  assert f'GPTJAX_SOURCE = os.environ.get("GPTJAX_SOURCE", "{repository}")' in settings
  install = next(cell for cell in _code_cells() if '"pip", "install"' in cell)
  extras = re.findall(r'\("(\w+)", (?:not )?GPTJAX_', install)  # ("name", condition)
  assert {"tpu", "hf", "gcs"} <= set(extras) <= set(project["optional-dependencies"])  # hf: datasets, for hf: data


# The notebook's TPU runs: trained only on a TPU runtime, with data from the Hugging Face Hub.
TPU_RUN_NAMES = {"gpt2_small_web", "sst2_gpt2", "conll2003_gpt2"}


def notebook_tpu_runs() -> dict[str, list[str]]:
  """The notebook's TPU_RUNS: run name -> its arguments to `python -m gptjax.main` (without --workdir)."""
  cells = [cell for cell in _code_cells() if "TPU_RUNS = " in cell]
  assert len(cells) == 1, "the TPU runs' arguments belong in one code cell, TPU_RUNS = {...}"
  namespace = {}
  exec(cells[0], namespace)  # pylint: disable=exec-used  # plain data: it needs nothing from the cells above
  assert set(namespace) == {"__builtins__", "TPU_RUNS"}, "the TPU_RUNS cell holds only the data"
  return namespace["TPU_RUNS"]


def parse_run(argv: list[str]):
  """The config `python -m gptjax.main *argv` runs: the --config file (relative to the checkout, as in the notebook,
  which runs in it) with its --config.* overrides applied by ml_collections as on the command line."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  argv = ["gptjax.main", *(re.sub(r"^--config=(?!/)", f"--config={ROOT}/", a) for a in argv)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=values, lock_config=True,
                                  sys_argv=argv)  # where it reads the --config.* overrides from (else sys.argv)
  values(argv)
  return values.config


def notebook_tpu_configs() -> dict:
  """Run name -> the config (an ml_collections.ConfigDict, locked as gptjax.main's) of each of the notebook's TPU
  runs, freshly parsed on every call. The fine-tuning runs keep their config files' model section: their model is
  checkpoint.init_from's (hf:gpt2, GPT-2 small), loaded at run time."""
  return {name: parse_run(argv) for name, argv in notebook_tpu_runs().items()}


def test_notebook_tpu_runs_parse_into_valid_configs():
  from gptjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from gptjax.data import corpus  # pylint: disable=import-outside-toplevel
  from gptjax.finetune import tasks  # pylint: disable=import-outside-toplevel
  runs = notebook_tpu_runs()
  assert set(runs) == TPU_RUN_NAMES
  for name, argv in runs.items():
    assert argv[0].startswith("--config=configs/") and all(a.startswith("--config.") for a in argv[1:]), name
  configs = notebook_tpu_configs()
  for name, config in configs.items():
    assert config.model.dtype == "bfloat16", name
    assert config.checkpoint.every_steps > 0 and config.checkpoint.keep >= 1, name
    config_lib.validate(config, 1)  # one v5e chip
    if "task" in config:
      tasks.validate(config, 1)  # hf: paths parse (no network), a base model is named
      assert config.checkpoint.init_from == "hf:gpt2", name
      for path in (config.task.train_path, config.task.eval_path):
        assert path.startswith("hf:"), (name, path)
        corpus.parse_hf(path)
      assert corpus.parse_hf(config.task.eval_path)[2] == "validation", name
    else:
      assert config.data.path.startswith("hf:") and config.data.max_documents > 0, name
      corpus.parse_hf(config.data.path)
  small = configs["gpt2_small_web"]
  # The micro-batch the TPU compiler fitted to v5e-1 (python -m gptjax.plan --tpu=v5e-1): 8 x 64 steps, pinned.
  assert small.model.n_layer == 12 and small.model.block_size == 1024
  assert small.train.micro_batch_size == 8 and small.train.batch_size // small.train.micro_batch_size == 64
  assert configs["sst2_gpt2"].task.kind == "classify" and configs["conll2003_gpt2"].task.kind == "ner"
  # CoNLL-2003's longest batches (32 x 512 tokens) exceed v5e-1's HBM without remat (the TPU compiler: 16.26 GiB).
  assert configs["conll2003_gpt2"].model.remat == "dots"


def test_notebook_launches_each_tpu_run_only_on_a_tpu_in_its_own_workdir():
  cells = _code_cells()
  for name in TPU_RUN_NAMES:
    launch = [cell for cell in cells if f'TPU_RUNS["{name}"]' in cell]
    assert len(launch) == 1, name
    assert launch[0].startswith('if platform == "tpu":\n'), name
    assert (f'run(sys.executable, "-m", "gptjax.main", *TPU_RUNS["{name}"], f"--workdir={{WORKDIR}}/{name}")'
            in launch[0]), name
    assert f'print("{name} skipped: ' in launch[0], name


def test_notebook_references_what_exists():
  code = "\n".join(_code_cells())
  modules = re.findall(r'"-m", "(gptjax\.\w+)"', code)
  assert set(modules) == {"gptjax.main", "gptjax.sample"}
  for module in modules:
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
  configs = re.findall(r"--config=([\w/.]+)", code)
  assert configs and all((ROOT / c).is_file() for c in configs)
  sample_call = code[code.index('"gptjax.sample"'):]
  sample_call = sample_call[:sample_call.index(")")]
  sample_source = (ROOT / "gptjax/sample.py").read_text()
  for flag in re.findall(r"--(\w+)=", sample_call):
    assert re.search(rf'DEFINE_\w+\("{flag}"', sample_source), flag
  # The metrics the notebook plots: written by the loop itself, or the pretraining job's evaluation.
  loop_source = (ROOT / "gptjax/loop.py").read_text()
  evaluation_source = (ROOT / "gptjax/pretrain.py").read_text()
  for key in re.findall(r'r\["(\w+)"\]', code):
    assert (key == "step" or re.search(rf"writer\.write\((?:self\.)?step,[^\n]*\b{key}=", loop_source)
            or f'"{key}":' in evaluation_source), key


@pytest.fixture
def client(tmp_path, monkeypatch):
  """Makes an nbclient client for the notebook in tmp_path, with the given GPTJAX_* environment."""
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  pytest.importorskip("ipykernel")
  monkeypatch.chdir(tmp_path)

  def make(**env):
    for key in ("GPTJAX_SOURCE", "GPTJAX_WORKDIR", "GPTJAX_ALLOW_CPU", "GPTJAX_STEPS"):
      monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
      monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  return make


def _text(cell) -> str:
  return "".join(o.get("text", "") + o.get("evalue", "") for o in cell.outputs)


def _index(nb, marker: str) -> int:
  return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and marker in c.source)


@pytest.mark.slow
def test_notebook_runs_on_cpu_and_the_training_cell_resumes(client, tmp_path):
  workdir = tmp_path / "run"
  nb_client = client(GPTJAX_SOURCE=str(ROOT), GPTJAX_ALLOW_CPU="1", GPTJAX_WORKDIR=str(workdir))
  nb = nb_client.nb
  train = _index(nb, '"gptjax.main"')
  with nb_client.setup_kernel():
    for i, cell in enumerate(nb.cells):  # top to bottom, as Run all
      nb_client.execute_cell(cell, i)
    first = _text(nb.cells[train])
    nb_client.execute_cell(nb.cells[train], train)  # the training cell again, as after a recycled runtime
    again = _text(nb.cells[train])
  assert f"gptjax installed from {ROOT}" in _text(nb.cells[_index(nb, "pip")])
  assert re.search(r"JAX sees \d+ x cpu \(cpu\)", _text(nb.cells[_index(nb, "probe")]))
  assert "done: step 20 (20 this run" in first and "loss: train " in first
  assert (workdir / "checkpoints" / "10").is_dir() and (workdir / "checkpoints" / "20").is_dir()
  assert f"resumed from {workdir}/checkpoints/20" in again and "done: step 20 (0 this run" in again
  assert "1 x 200 tokens in" in _text(nb.cells[_index(nb, '"gptjax.sample"')])
  for name in TPU_RUN_NAMES:  # the TPU runs need a TPU and the Hub: skipped on this CPU, saying so
    assert f"{name} skipped: it needs a TPU runtime" in _text(nb.cells[_index(nb, f'TPU_RUNS["{name}"]')])
  plot = nb.cells[_index(nb, "plt.show()")]
  assert any("image/png" in o.get("data", {}) for o in plot.outputs)


def test_notebook_stops_at_a_failed_install_and_says_what_to_set(client, tmp_path):
  nbclient = pytest.importorskip("nbclient")
  nb_client = client(GPTJAX_SOURCE=str(tmp_path / "no-such-archive.zip"), GPTJAX_ALLOW_CPU="1")
  with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
    nb_client.execute()
  assert "Set GPTJAX_SOURCE in the first code cell" in str(error.value)
  ran = [c for c in nb_client.nb.cells if c.cell_type == "code" and c.execution_count]
  assert len(ran) == 2  # the settings and the install: nothing after the failure


def test_notebook_refuses_a_cpu_runtime_unless_allowed(client):
  nbclient = pytest.importorskip("nbclient")
  nb_client = client()
  nb = nb_client.nb
  settings, probe = _index(nb, "GPTJAX_SOURCE = "), _index(nb, "probe")
  with nb_client.setup_kernel():
    nb_client.execute_cell(nb.cells[settings], settings)
    with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
      nb_client.execute_cell(nb.cells[probe], probe)  # gptjax is installed here already: no install cell
  assert "JAX fell back to CPU" in str(error.value) and "GPTJAX_ALLOW_CPU" in str(error.value)
