"""Orbax checkpoints in <workdir>/checkpoints: the train state, the config (JSON) and the tokenizer.

Restores always go through an abstract target that carries the *current* mesh's shardings, so a checkpoint
written on one mesh loads onto another.
"""

import os
import shutil

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  """The run's CheckpointManager (async saves, keeps the last `keep`)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                               item_names=("state", "config"))


def save(mngr: ocp.CheckpointManager, step: int, state, config, force: bool = False) -> bool:
  """Starts an async save of `state` and the config at `step`; returns whether a save was started."""
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 config=ocp.args.JsonSave(config.to_dict())), force=force)


def restore_state(mngr: ocp.CheckpointManager, step: int, shardings, abstract_state):
  """Restores the state saved at `step` onto `shardings` (any mesh)."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored["state"]


def copy_tokenizer(tokenizer, workdir: str) -> str:
  """Keeps the tokenizer next to the checkpoints so a run directory is self-contained."""
  directory = os.path.join(workdir, "tokenizer")
  if jax.process_index() == 0:
    if os.path.isdir(directory):
      shutil.rmtree(directory)
    tokenizer.save(directory)
  return directory
