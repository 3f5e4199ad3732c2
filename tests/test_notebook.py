"""launch/colab_tpu.ipynb: its structure, its default source, and the notebook executed top to bottom on CPU."""

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
  repository = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
  settings = _code_cells()[0]
  assert f'GPTJAX_SOURCE = os.environ.get("GPTJAX_SOURCE", "{repository}")' in settings


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
    assert (key == "step" or re.search(rf"writer\.write\(step,[^\n]*\b{key}=", loop_source)
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
