"""What the one training loop (gptjax/loop.py) runs: a `Job`, built by pretraining (gptjax/pretrain.py) or by a
fine-tuning task (gptjax/finetune/job.py). The loop owns everything else: checkpoints and exact resume, stop
signals and the multi-host stop agreement, the non-finite guard, the profiler, progress, metrics, summary.json."""

import dataclasses
from typing import Any, Callable, Iterator

import jax
import optax
from flax import nnx

from gptjax.model import GPTConfig


@dataclasses.dataclass
class Job:
  """A training job: the model, its train state, data and evaluation."""
  config: Any  # the resolved config (e.g. train.steps set from task.epochs)
  model_cfg: GPTConfig  # the model as trained (fine-tuning: with its adapters)
  graphdef: nnx.GraphDef  # of model_cfg, with the run's dropout
  tokenizer: Any
  tx: optax.GradientTransformation
  abstract: dict  # the train state {'step', 'skipped', 'params' (what is trained), 'opt_state'}, abstract
  shardings: dict  # its shardings
  init_state: Callable[[], dict]  # step 0's train state, placed by `shardings`
  batches: Iterator  # this process's training batches: trees of arrays [local batch, ...]; get_state/set_state
  evaluate: Callable[[dict, bool], dict]  # (trained params, final) -> metrics; 'val_loss' ranks checkpoints
  finish: Callable[[dict, int], tuple[dict, list[str]]]  # (state, step) after the last save -> (summary, samples)
  # (this process's batch) -> the tokens of the whole step, all processes together (tokens/s, MFU, tokens seen)
  tokens: Callable[[Any], int]
  steps: int
  flops_per_token: float
  description: list[str]  # log lines
  use_dropout: bool  # whether the train step draws dropout keys (the run's dropout rate > 0)
  objective: Callable | None = None  # (params, frozen, batch, key) -> loss; None = next-token cross-entropy
  frozen: dict | None = None  # parameters used but not trained (a base under adapters), placed
  frozen_shardings: dict | None = None
  # (trained params) -> (plain GPT params, graphdef) for text scoring and generation (eval.harness_*); None = the
  # job's model is not a language model (classification, NER).
  language_model: Callable[[dict], tuple[dict, nnx.GraphDef]] | None = None


def log(msg: str, *args) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(msg % args if args else msg, flush=True)
