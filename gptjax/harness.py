"""Any gptjax language model as an lm-evaluation-harness `LM`: the field's benchmarks, computed the field's way.

The harness asks three things (docs/evaluate.md):
- loglikelihood(context, continuation): the continuation's summed log-probability and whether greedy decoding
  would produce it. Context and continuation are tokenized by the harness's own `TemplateLM` code, as its Hugging
  Face backend does, and a pair longer than the context keeps its last block_size + 1 tokens.
- loglikelihood_rolling(text): the text's log-probability in the harness's disjoint rolling windows
  (`lm_eval.utils.get_rolling_token_windows`), the first token conditioned on end-of-text.
- generate_until(context, {until, max_gen_toks, do_sample, temperature, ...}): KV-cache decoding (`generate`),
  the context cut on the left to block_size - max_gen_toks tokens, the text cut before the first stop string.

Requests are scored in batches of `batch_size` rows padded to a few power-of-two lengths: one compiled program per
length, whatever the requests. Parameters placed on a mesh stay there and the rows are split over its batch axes;
on several processes every process runs the same requests and gets every answer (one may write them).
Log-probabilities are over the tokenizer's vocabulary, not the model's padded one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models import utils as lm_eval_model_utils
from tqdm import tqdm

from gptjax import config as config_lib, errors, generate, quantize, sharding

# The harness's default for generate_until requests that name no max_gen_toks (its HF backend's).
MAX_GEN_TOKS = 256


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab", "mesh", "rules"))
def _score(params, inputs_BT, targets_BT, scored_BT, graphdef, vocab, mesh, rules):
  """Each row's summed log p(target) over its scored positions, and whether every scored target is the argmax."""
  model = nnx.merge(graphdef, quantize.dequantize(params))
  forward = lambda tokens_BT: model.logits(model(tokens_BT))
  if mesh is not None:  # the kernels and activation constraints read the mesh and rules, as in training
    forward = sharding.under_mesh(forward, mesh, rules)
  logits_BTV = forward(inputs_BT)[..., :vocab].astype(jnp.float32)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
  logprob_BT = target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
  greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
  out = jnp.sum(jnp.where(scored_BT, logprob_BT, 0.0), -1), jnp.all(greedy_BT | ~scored_BT, -1)
  # Every process reads every row's answer.
  return out if mesh is None else jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))


class GptjaxLM(TemplateLM):
  """The harness's view of a gptjax model: `params` (placed on a mesh or not), its graphdef and tokenizer."""

  def __init__(self, params, graphdef, tokenizer, batch_size: int = 16, rules=config_lib.DEFAULT_RULES,
               weights: str | None = None, seed: int = 1234, progress: bool = True):
    super().__init__()
    self.graphdef, self.tokenizer = graphdef, tokenizer
    self.params = quantize.quantize(params, weights)
    self.cfg = nnx.merge(graphdef, params).cfg
    self.mesh = sharding.params_mesh(params)
    self.rules, self.seed, self.progress = rules, seed, progress
    degree = 1 if self.mesh is None else sharding.batch_degree(self.mesh, rules)
    # Rows split evenly over the batch's devices.
    self.rows = -(-batch_size // degree) * degree

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return self.cfg.block_size

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # GPT-2 tokenizers add no special tokens
    return self.tokenizer.encode(string).tolist()

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(np.asarray(tokens, np.int64))

  def _placed(self, array: np.ndarray):
    """The rows as one global array split over the mesh's batch axes (every process holds all of them)."""
    if self.mesh is None:
      return array
    placement = sharding.batch_sharding(self.mesh, self.rules, array.ndim)
    return jax.make_array_from_callback(array.shape, placement, lambda index: array[index])

  def score_tokens(self, pairs: list[tuple[list[int], list[int]]], desc: str = "") -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) for token pairs, as the harness's HF backend scores them."""
    rows = []
    for context, continuation in pairs:
      if not context or not continuation:
        raise ValueError("a scored pair needs at least one context and one continuation token.")
      window = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((window, len(continuation)))
    # Longest first in each length bucket, so a batch's rows are alike; answers go back in the request order.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    answers: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    bar = tqdm(total=len(rows), desc=desc or "score", unit="request", disable=not self.progress)
    vocab = self.tokenizer.vocab_size
    for start in range(0, len(order), self.rows):
      batch = order[start:start + self.rows]
      length = generate.bucket(max(len(rows[i][0]) - 1 for i in batch), self.max_length)
      inputs_BT = np.zeros((self.rows, length), np.int32)
      targets_BT = np.zeros((self.rows, length), np.int32)
      scored_BT = np.zeros((self.rows, length), bool)
      for b, i in enumerate(batch):
        window, n_scored = rows[i]
        n = len(window) - 1
        inputs_BT[b, :n], targets_BT[b, :n] = window[:-1], window[1:]
        scored_BT[b, n - n_scored:n] = True
      placed = map(self._placed, (inputs_BT, targets_BT, scored_BT))
      logprob_B, greedy_B = jax.device_get(_score(self.params, *placed,
                                                  self.graphdef, vocab, self.mesh, self.rules))
      for b, i in enumerate(batch):
        answers[i] = (float(logprob_B[b]), bool(greedy_B[b]))
      bar.update(len(batch))
    bar.close()
    return answers

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    del disable_tqdm, kwargs
    return self.score_tokens([(context, continuation) for _, context, continuation in requests], "loglikelihood")

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    windows, owner = [], []
    for r, (text,) in enumerate(request.args for request in requests):
      for window in lm_eval_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                            prefix_token=self.prefix_token_id,
                                                            max_seq_len=self.max_length, context_len=1):
        windows.append(lm_eval_utils.make_disjoint_window(window))
        owner.append(r)
    totals = [0.0] * len(requests)
    for r, (logprob, _) in zip(owner, self.score_tokens(windows, "loglikelihood_rolling")):
      totals[r] += logprob
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
    out = [""] * len(requests)
    bar = tqdm(total=len(requests), desc="generate_until", unit="request", disable=not self.progress)
    for members in groups.values():
      kwargs = lm_eval_model_utils.normalize_gen_kwargs(requests[members[0]].args[1], MAX_GEN_TOKS)
      # No end-of-text string: a row ends at the eos token, which decoding drops (as the HF backend's does).
      until = lm_eval_model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=None)
      max_gen_toks = kwargs.pop("max_gen_toks")
      if max_gen_toks >= self.max_length:
        raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a context in the model's "
                         f"{self.max_length} tokens.")
      sampled = kwargs.get("do_sample", False) and kwargs.get("temperature", 1.0) > 0
      sampling = generate.Sampling(temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
                                   top_k=int(kwargs.get("top_k") or 0) if sampled else 0,
                                   top_p=float(kwargs.get("top_p") or 1.0) if sampled else 1.0,
                                   vocab_limit=self.tokenizer.vocab_size, eos_id=self.eot_token_id)
      contexts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen_toks):] or [self.eot_token_id]
                  for i in members}
      members = sorted(members, key=lambda i: -len(contexts[i]))
      for start in range(0, len(members), self.rows):
        batch = members[start:start + self.rows]
        new_BN = generate.generate_batch(self.params, self.graphdef, [contexts[i] for i in batch], max_gen_toks,
                                         sampling, seed=self.seed + start, rules=self.rules)
        for i, row in zip(batch, new_BN):
          out[i] = lm_eval_model_utils.postprocess_generated_text(self.tok_decode(row), until, None)
        bar.update(len(batch))
    bar.close()
    return out


class TaskError(errors.UserError):
  """A harness task that does not exist or whose data cannot be read."""


def load_tasks(tasks: list[str], include_path: str | None = None):
  """The harness's TaskManager after checking that each task exists and its data can be read (downloaded once
  into the datasets cache); TaskError names the task that cannot."""
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  manager = TaskManager(include_path=include_path)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise TaskError(f"unknown harness task(s) {', '.join(unknown)}: name tasks as `lm_eval ls tasks` lists them, or "
                    "give their YAML files' directory as --include_path (eval.harness_include_path).")
  for task in tasks:
    try:
      manager.load_task_or_group([task])
    except (OSError, ValueError) as e:  # ConnectionError, FileNotFoundError, datasets' errors
      raise TaskError(f"the data of harness task {task!r} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                      "without a network, put a local copy of the task (its YAML and data files) in a directory "
                      "and pass it as --include_path (eval.harness_include_path).") from e
  return manager


def run_tasks(lm: GptjaxLM, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
              include_path: str | None = None, log_samples: bool = False, bootstrap_iters: int = 100000) -> dict:
  """The harness's evaluation of `lm` on `tasks` (its names, or those of YAML tasks under include_path): its
  whole output, `results` -> task -> 'metric,filter' -> value, and with log_samples the scored `samples`."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  manager = load_tasks(tasks, include_path)
  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                 log_samples=log_samples, task_manager=manager, bootstrap_iters=bootstrap_iters)


def headline(results: dict) -> dict[str, float]:
  """{'task/metric': value} of the harness's results, without filter suffixes (',none') and standard errors."""
  out = {}
  for task, metrics in results["results"].items():
    for key, value in metrics.items():
      metric, _, filter_name = key.partition(",")
      if "_stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)) or isinstance(value, bool):
        continue
      out[f"{task}/{metric}" + ("" if filter_name in ("", "none") else f"_{filter_name}")] = float(value)
  return out
