"""A fine-tuned model on disk: what was trained (LoRA adapters + head, or the whole model + head), kept apart.

  <dir>/task.json    task and LoRA settings, labels, the base model's config and tokenizer, where the base is
  <dir>/trainable/   Orbax: {'lora', 'head'} (LoRA: a few MB, the base is read from its own checkpoint)
                     or {'base', 'head'} (full fine-tuning)

`load` rebuilds it on top of the recorded base, or another copy of it (`base=`): the base's step and a fingerprint
of its parameters are recorded (`base_record`), that step is loaded, and a base that is not the one the adapters
were trained on (a workdir that trained on and rotated the step away, an overwritten export, another tokenizer) is
refused.
"""

import dataclasses
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from gptjax import checkpoint, config as config_lib, loader, paths, sharding
from gptjax.finetune import lora, tasks
from gptjax.model import GPT, GPTConfig

TASK_FILE = "task.json"


@dataclasses.dataclass
class FineTuned:
  """Everything needed to run a fine-tuned model: `tuning.make_predict(graphdef, task.loss, lora_cfg)`."""
  config: ml_collections.ConfigDict  # the fine-tuning config (task, lora, train sections)
  base_config: ml_collections.ConfigDict
  labels: list[str]
  graphdef: nnx.GraphDef
  trainable: dict
  frozen: dict
  lora_cfg: lora.LoraConfig | None
  tokenizer: object
  step: int


def base_record(path: str, base: checkpoint.LoadedModel) -> dict:
  """Which base a fine-tuning run trains on: where, at which step, and the fingerprint of its parameters."""
  return {"path": path, "step": base.step, "fingerprint": checkpoint.fingerprint(base.params)}


def load_base(record: dict, mesh=None, path: str | None = None) -> checkpoint.LoadedModel:
  """The base of `record` (read from `path`, default the recorded one) at the recorded step; a CheckpointError
  when that step cannot be read, a ConfigError when the parameters there are not the recorded ones."""
  path = path or record["path"]
  what = f"the base model {path!r} at step {record['step']} (what the adapters were trained on)"
  try:
    base = loader.load_model(path, mesh, step=record["step"])
  except checkpoint.CheckpointError as e:
    raise checkpoint.CheckpointError(f"{what} cannot be loaded: {e} Keep or export that step of the base, or "
                                     "fine-tune again.") from e
  found = checkpoint.fingerprint(base.params)
  if found != record["fingerprint"]:
    raise config_lib.ConfigError(f"{what} has parameters {found}, not the {record['fingerprint']} the adapters "
                                 "were trained on: the base was overwritten or retrained. Point to the original "
                                 "base (checkpoint.init_from, or base=), or fine-tune again.")
  return base


def save(out_dir: str, config, base_config, labels: list[str], trainable: dict, tokenizer, step: int,
         base: dict) -> str:
  """Writes trainable + task.json to out_dir, replacing an earlier save only once the new one is complete.

  Object stores cannot rename a directory (they copy every object), so there the earlier save is deleted first and
  the new one written in place: task.json, written last, marks it complete.
  """
  out_dir = paths.absolute(out_dir)
  remote = paths.is_remote(out_dir)
  partial = out_dir if remote else out_dir + ".partial"
  paths.rmtree(partial)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(partial, "trainable"), trainable)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    meta = {"config": config.to_dict(), "base_config": base_config.to_dict(), "labels": labels, "step": step,
            "tokenizer": checkpoint.tokenizer_files(tokenizer), "base": base}
    paths.write_json(os.path.join(partial, TASK_FILE), meta, indent=None)
    if not remote:
      paths.rmtree(out_dir)
      paths.path(partial).rename(out_dir)
  return out_dir


def load(path: str, mesh=None, base: str | None = None) -> FineTuned:
  """A fine-tuned model from `path` (a fine-tuning workdir or its finetuned/ directory), placed on `mesh`.

  LoRA adapters go on top of `base` (default: the checkpoint.init_from they were trained from).
  """
  directory = path if paths.path(os.path.join(path, TASK_FILE)).exists() else os.path.join(path, "finetuned")
  if not paths.path(os.path.join(directory, TASK_FILE)).exists():
    raise checkpoint.CheckpointError(f"{path!r} holds no fine-tuned model ({TASK_FILE} missing): pass the workdir "
                                     "of a fine-tuning run or its finetuned/ directory.")
  meta = paths.read_json(os.path.join(directory, TASK_FILE))
  # The current defaults fill in fields added since the model was saved (e.g. task.words_field).
  config = tasks.add_task_config(config_lib.default_config(), meta["config"]["task"]["kind"])
  config.update(meta["config"])
  base_config = ml_collections.ConfigDict(meta["base_config"])
  tokenizer = checkpoint.tokenizer_from_files(meta["tokenizer"])
  lora_cfg = lora.LoraConfig.of(config.lora)
  model_cfg, _, params_target = checkpoint.inference_target(
      base_config, config_lib.check_vocab(base_config, tokenizer.vocab_size), mesh)
  # Head and adapters replicated on the mesh inference_target placed the params on.
  replicated = sharding.replicated(jax.tree.leaves(params_target)[0].sharding.mesh)
  place = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)
  head_target = place(jax.eval_shape(lambda: _init_head(config, base_config, len(meta["labels"]))))
  if lora_cfg is None:
    frozen, target = {}, {"base": params_target, "head": head_target}
  else:
    loaded = (load_base(meta["base"], mesh, base) if "base" in meta else  # saved before bases were recorded
              loader.load_model(base or config.checkpoint.init_from, mesh))
    if loaded.tokenizer.fingerprint != tokenizer.fingerprint:
      raise config_lib.ConfigError(f"the base model {base or config.checkpoint.init_from!r} has tokenizer "
                                   f"{loaded.tokenizer.fingerprint}, the adapters in {directory} were trained with "
                                   f"{tokenizer.fingerprint}; load them onto the model they were trained from.")
    frozen = {"base": loaded.params}
    adapters = jax.eval_shape(lambda: lora.init_adapters(lora_cfg.model(model_cfg), jax.random.key(0)))
    target = {"lora": place(adapters), "head": head_target}
  try:
    trainable = ocp.StandardCheckpointer().restore(os.path.join(paths.absolute(directory), "trainable"), target)
  except Exception as e:  # Orbax raises many types for missing or corrupt files
    raise checkpoint.CheckpointError(f"{directory}/trainable cannot be read ({type(e).__name__}: {str(e)[:300]});"
                                     " fine-tune again or restore the directory.") from e
  run_cfg = model_cfg if lora_cfg is None else lora_cfg.model(model_cfg)
  return FineTuned(config, base_config, meta["labels"], graphdef_of(run_cfg), trainable, frozen, lora_cfg,
                   tokenizer, meta["step"])


def _init_head(config, base_config, n_labels: int) -> dict:
  return tasks.make_task(config.task).init_head(base_config.model.n_embd, n_labels, jax.random.key(0), None)


def graphdef_of(model_cfg: GPTConfig, dropout: float = 0.0) -> nnx.GraphDef:
  """The NNX graph of a GPT of this shape with the given dropout rate."""
  return nnx.split(nnx.eval_shape(lambda: GPT(dataclasses.replace(model_cfg, dropout=dropout), nnx.Rngs(0))))[0]
