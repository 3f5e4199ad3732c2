"""Any model a user names, ready for inference: a run's workdir, an export, or 'hf:<Hugging Face GPT-2>'.

Above both `checkpoint` (gptjax's own formats) and `hf` (the Hugging Face import), which do not know each other's
paths: this is the one place that dispatches on the name.
"""

from gptjax import checkpoint, hf, paths
from gptjax.hf import HF_PREFIX


def load_model(path: str, mesh=None, step: int | None = None) -> checkpoint.LoadedModel:
  """Loads parameters from a run's workdir (latest or given step), an exported directory, or 'hf:<dir or name>'."""
  if path.startswith(HF_PREFIX):
    return hf.import_hf(path[len(HF_PREFIX):], mesh)
  return checkpoint.load_saved(path, mesh, step)


def export(path: str, out_dir: str, dtype: str = "float32", step: int | None = None) -> str:
  """Writes any loadable model as a parameters-only export (params in `dtype`, config, tokenizer) to out_dir."""
  loaded = load_model(path, step=step)
  source = path if path.startswith(HF_PREFIX) else paths.absolute(path)
  return checkpoint.write_export(out_dir, loaded.params, loaded.config, loaded.tokenizer, loaded.step, dtype, source)
