"""Orbax checkpoints of a run: train state, Grain iterator state, config and tokenizer, in <workdir>/checkpoints.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it when complete), so a
process killed mid-save leaves the previous checkpoints intact. Restores always go through an abstract target
that carries the *current* mesh's shardings: a checkpoint written on one mesh loads onto any other.
"""

import base64
import dataclasses
import hashlib
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from gptjax import config as config_lib, paths, sharding, train
from gptjax.data.tokenizer import from_saved
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig

EXPORT_MARKER = "export.json"
DATA_POSITION = "data_position"  # the item holding the data pipeline's global position (`BatchStream`)
LEGACY_DATA = "data"  # before: Grain's iterator state, one file per process (process_<i>-of-<n>.json)
# Train state entries a checkpoint may lack (saved before their setting was on), with their step-0 value's maker.
OPTIONAL_STATE = {"spikes": lambda abstract: train.new_spike_history(abstract["loss"].shape[0])}


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be read; the message names it and what to do."""


def manager(workdir: str, config, metric: str = "val_loss", higher_is_better: bool = False) -> ocp.CheckpointManager:
  """The run's CheckpointManager: keeps the last `checkpoint.keep`, and the `keep_best` best by `metric` of those
  saved with it (`save`'s evaluation)."""
  ck = config.checkpoint
  policies = [checkpoint_managers.LatestN(n=ck.keep)]
  ranked = {}
  if ck.keep_best:
    # BestN keeps the last n in sorted order: descending when lower is better.
    policies.append(checkpoint_managers.BestN(get_metric_fn=lambda m: m[metric], reverse=not higher_is_better,
                                              n=ck.keep_best, keep_checkpoints_without_metrics=False))
    # Orbax writes a checkpoint's metrics to disk (so a resumed run still ranks the old ones) only with a best_fn;
    # the saves between evaluations have none, which it would warn about at each.
    ranked = dict(best_fn=lambda m: m[metric], best_mode="max" if higher_is_better else "min")
    logging.get_absl_logger().addFilter(lambda record: "did not provide metrics" not in record.getMessage())
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=ck.async_save, create=True,
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies), **ranked)
  return ocp.CheckpointManager(paths.absolute(os.path.join(workdir, "checkpoints")), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator, config, tokenizer,
         evaluation: dict | None = None) -> None:
  """Starts an (async) save of everything a run needs to continue exactly; returns once arrays are copied.
  `evaluation` ({metric: value} at this step) is what checkpoint.keep_best ranks it by."""
  items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()),
               tokenizer=ocp.args.JsonSave(tokenizer_files(tokenizer)))
  if data_iterator is not None:
    items[DATA_POSITION] = ocp.args.JsonSave(data_iterator.get_state())
  mngr.save(step, args=ocp.args.Composite(**items), force=True,
            metrics={k: float(v) for k, v in evaluation.items()} if evaluation else None)


class UnreadableCheckpoint(CheckpointError):
  """A checkpoint proven broken (missing, truncated or inconsistent files): set aside, the one before it resumes."""


# What storage says when it failed to answer or refused, rather than answered with broken data: gRPC/absl status
# names (TensorStore), HTTP status codes (in TensorStore's messages; gcsfs's errors carry them as `code`).
_STORAGE_FAILURES = re.compile(r"PERMISSION_DENIED|UNAUTHENTICATED|UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|"
                               r"\b(?:HTTP|response|status|code)\D{0,20}\b(?:401|403|408|429|5\d\d)\b|Forbidden")


def storage_failure(error: BaseException) -> bool:
  """Whether `error` (or what caused it) is storage failing to answer or refusing, not a broken checkpoint."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (PermissionError, ConnectionError, TimeoutError)):
      return True
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.errno is not None:
      return True  # EIO, EACCES, ENOSPC...: the storage, not the bytes in it
    code = next((getattr(error, a) for a in ("code", "status_code", "status") if hasattr(error, a)), None)
    if isinstance(code, int) and (code in (401, 403, 408, 429) or 500 <= code < 600):  # gcsfs's HttpError...
      return True
    if _STORAGE_FAILURES.search(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _read_error(where: str, error: Exception) -> CheckpointError:
  """The error to raise for a checkpoint that failed to read: a storage failure stops the run and touches nothing
  (a network hiccup must not roll a run back); anything else means the files themselves are broken."""
  what = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"  # one line
  if storage_failure(error):
    return paths.StorageError(f"checkpoint {where} could not be read from its storage ({what}); nothing was changed. "
                              "Check access to it (credentials, permissions, network) and rerun to resume.")
  return UnreadableCheckpoint(f"checkpoint {where} cannot be read ({what})")


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, shardings, data_iterator=None, tokenizer=None):
  """(state, step) of the newest checkpoint that reads back, or (None, None) when there is none.

  A checkpoint whose files are broken (truncated, missing, inconsistent) is set aside with a warning and the
  previous one is tried, so a run never stops on one bad file while good ones exist. Storage that fails to answer
  or refuses stops with a StorageError and changes nothing; a checkpoint of other shapes than the config's, or
  (with `tokenizer`) trained with another tokenizer, stops with a ConfigError.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  unreadable = []
  for step in steps:
    try:
      if tokenizer is not None:
        check_tokenizer(mngr, step, tokenizer)
      state = restore(mngr, step, abstract_state, shardings, data_iterator)
    except UnreadableCheckpoint as e:
      logging.warning("%s; falling back to the previous checkpoint.", e)
      print(f"WARNING: {e}; falling back to the previous checkpoint.", flush=True)
      unreadable.append(step)
      continue
    _set_aside(mngr, unreadable)
    return state, step
  if steps:
    raise CheckpointError(f"none of the checkpoints {steps} in {mngr.directory} can be read; move the directory "
                          "away to start afresh.")
  return None, None


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Renames unreadable checkpoints to corrupt-<step>-<time> (kept for inspection) so new saves can use the step."""
  if steps and jax.process_index() == 0:
    for step in steps:
      source = os.path.join(str(mngr.directory), str(step))
      target = os.path.join(str(mngr.directory), f"corrupt-{step}-{int(time.time())}")
      paths.path(source).rename(target)
      print(f"WARNING: moved the unreadable checkpoint {source} to {target}", flush=True)
  mngr.reload()


def check_tokenizer(mngr: ocp.CheckpointManager, step: int, tokenizer) -> None:
  """Raises ConfigError when the checkpoint at `step` was trained with a different tokenizer."""
  try:
    saved = tokenizer_from_files(mngr.restore(step, args=ocp.args.Composite(
        tokenizer=ocp.args.JsonRestore()))["tokenizer"])
  except Exception as e:
    raise _read_error(f"{mngr.directory}/{step}", e) from e
  if saved.fingerprint != tokenizer.fingerprint:
    raise config_lib.ConfigError(
        f"checkpoint {mngr.directory}/{step} was trained with tokenizer {saved.fingerprint} ({saved.kind}, "
        f"{saved.vocab_size} tokens) but the data now gives {tokenizer.fingerprint} ({tokenizer.kind}, "
        f"{tokenizer.vocab_size} tokens): the corpus or data.* settings changed. Restore them, or use a new "
        "--workdir (with checkpoint.init_from only if the tokenizer is the same).")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, shardings, data_iterator=None):
  """The train state saved at `step`, placed by `shardings` (any mesh); also rewinds `data_iterator`.

  Raises UnreadableCheckpoint (broken files), paths.StorageError (storage failed) or ConfigError (the checkpoint
  holds parameters of other shapes than `abstract_state`).
  """
  where = os.path.join(str(mngr.directory), str(step))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  saved = _saved_tree(os.path.join(where, "state"))
  # The spike history (train.spike_skip) starts empty when the setting is turned on, and is dropped when turned off.
  fresh = {k: target.pop(k) for k in OPTIONAL_STATE if k in target and saved is not None and k not in saved}
  replicated = sharding.replicated(shardings["step"].mesh)
  dropped = [k for k in OPTIONAL_STATE if k not in target and saved is not None and k in saved]
  for key in dropped:
    target[key] = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), saved[key],
                               is_leaf=lambda m: hasattr(m, "shape"))
  try:
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:  # Orbax/TensorStore raise many types for truncated or corrupt files
    error = _read_error(where, e)
    if isinstance(error, UnreadableCheckpoint) and saved is not None:
      _check_structure(where, saved, abstract_state)  # or it is another model, or another optimizer
    raise error from e
  for key in dropped:
    del state[key]
  for key, value in fresh.items():
    logging.info("checkpoint %s has no %r: it starts afresh", where, key)
    state[key] = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), OPTIONAL_STATE[key](value), value)
  if data_iterator is not None:
    _restore_data_position(mngr, step, where, data_iterator)
  return state


def _restore_data_position(mngr: ocp.CheckpointManager, step: int, where: str, data_iterator) -> None:
  """Rewinds `data_iterator` to the position saved at `step`, on any number of processes.

  Checkpoints from before the position was global hold Grain's iterator state per process; every process had read
  the same number of batches, so any process's file gives the global position.
  """
  try:
    if paths.path(paths.join(where, DATA_POSITION)).exists():
      saved = mngr.restore(step, args=ocp.args.Composite(**{DATA_POSITION: ocp.args.JsonRestore()}))[DATA_POSITION]
    else:
      legacy = paths.path(paths.join(where, LEGACY_DATA))
      files = sorted(legacy.glob("process_*-of-*.json")) if legacy.exists() else []
      if not files:
        logging.warning("checkpoint %s holds no data position: the data starts from the beginning", where)
        return
      own = legacy / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
      saved = json.loads((own if own.exists() else files[0]).read_text())
  except Exception as e:  # pylint: disable=broad-except
    raise _read_error(f"{where} (its data position)", e) from e
  try:
    data_iterator.set_state(saved)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint {where} holds a data position this version cannot read ({e}); resume it with "
                          "the gptjax version that wrote it.") from e


def _saved_tree(state_dir: str):
  """The saved train state's tree of array metadata (shapes), or None when it cannot be read."""
  try:
    saved = ocp.StandardCheckpointHandler().metadata(paths.path(paths.absolute(state_dir)))
  except Exception:  # pylint: disable=broad-except  # broken metadata: the checkpoint is unreadable, not other
    return None
  return getattr(saved, "tree", saved)


def _check_structure(where: str, saved, abstract_state) -> None:
  """ConfigError naming the first parameter, or else optimizer state entry, whose shape in the saved state differs
  from the config's (or that is missing there); nothing when they all match."""
  for key, what, fix in (("params", "a model of another shape", "model settings"),
                         ("opt_state", "an optimizer state of another form", "optimizer settings (e.g. "
                          "train.grad_clip on or off, LoRA/AdaLoRA settings)")):
    mismatch = train.first_shape_mismatch(saved.get(key, {}), abstract_state[key])
    if mismatch:
      name, there, here = mismatch
      raise config_lib.ConfigError(
          f"checkpoint {where} holds {what} than this config's: {key}{name} is "
          f"{'missing' if there is None else there} there and {here} here. Use the {fix} it was trained with to "
          "resume it, or a new --workdir.")


@dataclasses.dataclass
class LoadedModel:
  """A model ready for inference: config, shapes, NNX graph, parameters, tokenizer, and its training step."""
  config: ml_collections.ConfigDict
  model_cfg: GPTConfig
  graphdef: nnx.GraphDef
  params: dict
  tokenizer: object
  step: int


def load_saved(path: str, mesh=None, step: int | None = None) -> LoadedModel:
  """Loads parameters from a run's workdir (latest or given step) or an exported directory (see also
  `gptjax.loader.load_model`, which also takes 'hf:')."""
  if paths.path(os.path.join(path, EXPORT_MARKER)).exists():
    return _load_export(path, mesh)
  checkpoints = os.path.join(path, "checkpoints")
  if not paths.is_dir(checkpoints):
    raise CheckpointError(f"{path!r} is neither a run directory (no checkpoints/ inside) nor an exported model "
                          f"(no {EXPORT_MARKER}); pass the --workdir of a training run or an export.")
  mngr = ocp.CheckpointManager(paths.absolute(checkpoints), options=ocp.CheckpointManagerOptions(create=False))
  steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    raise CheckpointError(f"{checkpoints} holds no complete checkpoint yet.")
  try:
    meta = mngr.restore(steps[0], args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                           tokenizer=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax raises many types for missing or corrupt items
    raise CheckpointError(f"checkpoint {checkpoints}/{steps[0]} cannot be read ({type(e).__name__}: {str(e)[:300]}); "
                          "pass the --step of an older one, or move it away.") from e
  config = ml_collections.ConfigDict(meta["config"])
  tokenizer = tokenizer_from_files(meta["tokenizer"])
  model_cfg, graphdef, target = inference_target(config, config_lib.check_vocab(config, tokenizer.vocab_size), mesh)
  for s in steps:
    try:
      restored = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={"params": target}, restore_args=jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding),
                                                            {"params": target}), partial_restore=True)))
      return LoadedModel(config, model_cfg, graphdef, restored["state"]["params"], tokenizer, s)
    except Exception as e:
      logging.warning("checkpoint %s/%d cannot be read (%s); trying an older one.", checkpoints, s, e)
  raise CheckpointError(f"no checkpoint in {checkpoints} can be read (tried steps {steps}).")


def fingerprint(params) -> str:
  """A short hash that tells parameter trees apart: every leaf's path, shape and dtype, and 8 of its values (exact
  bits, so the same on any mesh and any number of processes)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  mesh = getattr(leaves[0][1].sharding, "mesh", None)

  def sample(x):
    flat = x.reshape(-1)
    return flat[jnp.linspace(0, flat.size - 1, 8).astype(jnp.int32)]
  samples = jax.jit(lambda xs: [sample(x) for x in xs],
                    out_shardings=None if mesh is None else sharding.replicated(mesh))([x for _, x in leaves])
  digest = hashlib.sha256()
  for (path, x), values in zip(leaves, samples):
    digest.update(f"{jax.tree_util.keystr(path)}{x.shape}{x.dtype}".encode())
    digest.update(np.asarray(values.addressable_data(0)).tobytes())
  return digest.hexdigest()[:16]


def write_export(out_dir: str, params, config, tokenizer, step: int, dtype: str = "float32", source: str = "") -> str:
  """Writes params (cast to `dtype`), config and tokenizer as an export that `load_model` reads."""
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  out_dir = paths.absolute(out_dir)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, "params"), params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with paths.atomic_write(os.path.join(out_dir, "config.json")) as f:
      f.write(config.to_json(indent=2))
    paths.write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_files(tokenizer), indent=None)
    # Last: marks a complete export.
    paths.write_json(os.path.join(out_dir, EXPORT_MARKER), {"step": step, "dtype": dtype, "source": source}, indent=2)
  return out_dir


def _load_export(path: str, mesh) -> LoadedModel:
  marker = paths.read_json(os.path.join(path, EXPORT_MARKER))
  config = ml_collections.ConfigDict(paths.read_json(os.path.join(path, "config.json")))
  tokenizer = tokenizer_from_files(paths.read_json(os.path.join(path, "tokenizer.json")))
  model_cfg, graphdef, target = inference_target(config, config_lib.check_vocab(config, tokenizer.vocab_size), mesh,
                                                 jnp.dtype(marker["dtype"]))
  try:
    params = ocp.StandardCheckpointer().restore(os.path.join(paths.absolute(path), "params"), target)
  except Exception as e:
    raise CheckpointError(f"exported parameters in {path}/params cannot be read ({e}); export again.") from e
  return LoadedModel(config, model_cfg, graphdef, params, tokenizer, marker["step"])


def inference_target(config, vocab: int, mesh=None, dtype=None):
  """(model_cfg, graphdef, abstract params placed on `mesh`) of a config; a 1-device mesh when none is given."""
  model_cfg = GPTConfig.from_config(config.model, vocab)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0))))
  if mesh is None:
    single = config_lib.default_config()
    single.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(single, jax.devices()[:1])
  shardings = sharding.state_shardings(abstract, config.mesh.rules, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), shardings)
  return model_cfg, graphdef, target


def tokenizer_files(tokenizer) -> dict:
  """The tokenizer's saved files as {name: base64}: a JSON item stored in every checkpoint."""
  return {name: base64.b64encode(content).decode("ascii") for name, content in sorted(tokenizer.files().items())}


def tokenizer_from_files(files: dict):
  return from_saved({name: base64.b64decode(content) for name, content in files.items()}, "a checkpoint's tokenizer")
