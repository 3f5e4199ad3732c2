"""Task data from Hugging Face datasets ('hf:NAME[:CONFIG][@SPLIT]'): the rows the task readers read from files.

A split is loaded whole (task data is small) and kept in `datasets`' cache, so reruns and resumes read it from
disk. Class ids of a ClassLabel column, or of a sequence of them (CoNLL-2003's `ner_tags`), become their names,
so labels and tags read the same as from files.
"""

from typing import Callable, Iterator

from gptjax.data.corpus import HF_PREFIX, load_hf, parse_hf

# The config fields that may hold a dataset spec, for errors (a reader does not know which one it was given).
SETTING = "task.train_path/eval_path"


def is_hf(path: str) -> bool:
  """Whether `path` names a Hugging Face dataset rather than a file."""
  return path.startswith(HF_PREFIX)


def _class_names(feature) -> Callable | None:
  """The function that names the class ids of a column with this feature, or None when it holds no class ids."""
  names = getattr(feature, "names", None)  # a ClassLabel
  if names is not None:
    return lambda v: names[v] if isinstance(v, int) and 0 <= v < len(names) else v  # -1: unlabelled (GLUE test)
  inner = feature[0] if isinstance(feature, list) and len(feature) == 1 else getattr(feature, "feature", None)
  one = _class_names(inner) if inner is not None else None  # datasets' List / Sequence of a feature
  return (lambda values: [one(v) for v in values] if isinstance(values, list) else values) if one else None


def rows(spec: str) -> Iterator[tuple[str, dict]]:
  """(where, {column: value}) of each row of the split `spec` names; where is 'hf:NAME[:CONFIG]@SPLIT:ROW'."""
  name, config, split = parse_hf(spec, SETTING)
  dataset = load_hf(spec, SETTING, streaming=False)
  features = getattr(dataset, "features", None) or {}
  decoders = {column: decode for column, feature in features.items() if (decode := _class_names(feature))}
  prefix = f"{HF_PREFIX}{name}{':' + config if config else ''}@{split}"
  for i, row in enumerate(dataset):
    yield f"{prefix}:{i}", {k: decoders[k](v) if k in decoders else v for k, v in row.items()}
