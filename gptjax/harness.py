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
def _score(params, inputs_BT, positions_BC, targets_BC, scored_BC, graphdef, vocab, mesh, rules):
  """Each row's summed log p(target) over its scored positions, and whether every scored target is the argmax.

  The LM head runs at `positions_BC` only (the continuation's, C <= T): a multiple-choice ending is a few tokens
  of a long context, and the head is a third of GPT-2 small's FLOPs per token."""
  model = nnx.merge(graphdef, quantize.dequantize(params))

  def logits(tokens_BT):
    h_BTD = model(tokens_BT)
    return model.logits(jnp.take_along_axis(h_BTD, positions_BC[..., None], 1))
  if mesh is not None:  # the kernels and activation constraints read the mesh and rules, as in training
    logits = sharding.under_mesh(logits, mesh, rules)
  return _sum_scored(logits(inputs_BT)[..., :vocab].astype(jnp.float32), targets_BC, scored_BC, mesh)


def row_bucket(n: int, rows: int, degree: int) -> int:
  """Rows for a batch of n requests: `rows`, or for a last, smaller batch the next power of two (a multiple of the
  mesh's batch degree), so that it computes no more padding rows than it must."""
  return min(rows, max(degree, -(-(1 << (n - 1).bit_length()) // degree) * degree))


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab", "mesh", "rules"))
def _score_shared(params, contexts_GC, pad_G, endings_GKE, scored_GKE, graphdef, vocab, mesh, rules):
  """`_score` for K continuations of each of G contexts: the context runs once into a KV cache (left-padded: row g
  begins at slot pad_G[g]), each continuation then runs from its own copy of that cache. Multiple choice (K
  endings after one context) costs one context and K endings instead of K contexts and K endings."""
  model = nnx.merge(graphdef, quantize.dequantize(params))
  (G, C), (K, E) = contexts_GC.shape, endings_GKE.shape[1:]

  def logits(contexts_GC, endings_GKE):
    cache = model.init_cache(G, C + E)
    h_GCD, cache = model.extend(contexts_GC, cache, jnp.int32(0), pad_G)
    # Each layer's [G * N, S, H] rows become [G * K * N, S, H]: context g's cache for each of its endings.
    cache = jax.tree.map(lambda a: jnp.repeat(a.reshape(G, -1, *a.shape[1:]), K, axis=0).reshape(-1, *a.shape[1:]),
                         cache)
    h_BED, _ = model.extend(endings_GKE.reshape(G * K, E), cache, jnp.int32(C), jnp.repeat(pad_G, K))
    # Ending token i is predicted at the slot before it: the context's last for i = 0.
    h_BED = jnp.concatenate([jnp.repeat(h_GCD[:, -1:], K, axis=0), h_BED[:, :-1]], axis=1)
    return model.logits(h_BED)
  if mesh is not None:
    logits = sharding.under_mesh(logits, mesh, rules)
  logits_BEV = logits(contexts_GC, endings_GKE)[..., :vocab].astype(jnp.float32)
  return _sum_scored(logits_BEV, endings_GKE.reshape(G * K, E), scored_GKE.reshape(G * K, E), mesh)


def _sum_scored(logits_BCV, targets_BC, scored_BC, mesh):
  """(Σ log p(target), all targets greedy) of each row over its scored positions; every process gets every row."""
  target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], -1)[..., 0]
  logprob_BC = target_BC - jax.nn.logsumexp(logits_BCV, axis=-1)
  greedy_BC = jnp.argmax(logits_BCV, axis=-1) == targets_BC
  out = jnp.sum(jnp.where(scored_BC, logprob_BC, 0.0), -1), jnp.all(greedy_BC | ~scored_BC, -1)
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
    # Rows split evenly over the batch's devices.
    self.rows = -(-batch_size // self._degree()) * self._degree()

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
    """(log p(continuation | context), greedy) for token pairs, as the harness's HF backend scores them.

    Pairs that share their context with others (multiple choice) and fit the context window run it once
    (`_score_shared`); the others run whole, cut on the left to block_size + 1 tokens (`_score`)."""
    for context, continuation in pairs:
      if not context or not continuation:
        raise ValueError("a scored pair needs at least one context and one continuation token.")
    answers: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    bar = tqdm(total=len(pairs), desc=desc or "score", unit="request", disable=not self.progress)
    groups: dict[tuple, list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
      if len(context) + len(continuation) <= self.max_length:
        groups.setdefault(tuple(context), []).append(i)
    # Sharing pays where the context outweighs the continuations (multiple choice), not for rolling windows
    # conditioned on one end-of-text token; a group is cut to at most a batch of continuations.
    shared = [members[start:start + self.rows] for context, members in groups.items()
              if len(members) > 1 and len(context) >= max(len(pairs[i][1]) for i in members)
              for start in range(0, len(members), self.rows)]
    shared = [members for members in shared if len(members) > 1]
    alone = sorted(set(range(len(pairs))) - {i for members in shared for i in members})
    self._score_shared_groups(pairs, shared, answers, bar)
    self._score_alone(pairs, alone, answers, bar)
    bar.close()
    return answers

  def _score_shared_groups(self, pairs, groups: list[list[int]], answers: list, bar) -> None:
    """Scores groups of pairs with one context each, G contexts x K continuations per batch."""
    vocab, degree = self.tokenizer.vocab_size, self._degree()
    groups = sorted(groups, key=lambda members: (len(members), len(pairs[members[0]][0])))
    while groups:
      K = len(groups[-1])  # the most continuations of the groups left; the batch takes groups of as many or fewer
      G = max(degree, self.rows // K // degree * degree)
      batch, groups = groups[-G:], groups[:-G]
      G = row_bucket(len(batch), G, degree)
      context_len = generate.bucket(max(len(pairs[m[0]][0]) for m in batch), self.max_length, 4)
      ending_len = generate.bucket(max(len(pairs[i][1]) for m in batch for i in m), self.max_length, 4)
      contexts_GC = np.zeros((G, context_len), np.int32)
      pad_G = np.full(G, context_len - 1, np.int32)  # filler groups: one token of context
      endings_GKE = np.zeros((G, K, ending_len), np.int32)
      scored_GKE = np.zeros((G, K, ending_len), bool)
      for g, members in enumerate(batch):
        context = pairs[members[0]][0]
        pad_G[g] = context_len - len(context)
        contexts_GC[g, pad_G[g]:] = context
        for k, i in enumerate(members):
          ending = pairs[i][1]
          endings_GKE[g, k, :len(ending)] = ending
          scored_GKE[g, k, :len(ending)] = True
      placed = map(self._placed, (contexts_GC, pad_G, endings_GKE, scored_GKE))
      logprob_B, greedy_B = jax.device_get(_score_shared(self.params, *placed, self.graphdef, vocab, self.mesh,
                                                         self.rules))
      for g, members in enumerate(batch):
        for k, i in enumerate(members):
          answers[i] = (float(logprob_B[g * K + k]), bool(greedy_B[g * K + k]))
      bar.update(sum(map(len, batch)))

  def _score_alone(self, pairs, indices: list[int], answers: list, bar) -> None:
    """Scores pairs one row each (left-truncated to block_size + 1 tokens), rows of similar length together."""
    rows = {i: ((list(pairs[i][0]) + list(pairs[i][1]))[-(self.max_length + 1):], len(pairs[i][1])) for i in indices}
    order = sorted(indices, key=lambda i: -len(rows[i][0]))
    vocab = self.tokenizer.vocab_size
    for start in range(0, len(order), self.rows):
      batch = order[start:start + self.rows]
      B = row_bucket(len(batch), self.rows, self._degree())
      length = generate.bucket(max(len(rows[i][0]) - 1 for i in batch), self.max_length, 4)
      scored = generate.bucket(max(min(rows[i][1], len(rows[i][0]) - 1) for i in batch), length, 4)
      inputs_BT = np.zeros((B, length), np.int32)
      positions_BC = np.zeros((B, scored), np.int32)
      targets_BC = np.zeros((B, scored), np.int32)
      scored_BC = np.zeros((B, scored), bool)
      for b, i in enumerate(batch):
        window, n_scored = rows[i]
        n = len(window) - 1
        inputs_BT[b, :n] = window[:-1]
        # The row's last `scored` positions (from 0 when it is shorter); its continuation is the last n_scored.
        positions_BC[b] = np.maximum(np.arange(n - scored, n), 0)
        targets_BC[b] = np.asarray(window[1:])[positions_BC[b]]
        scored_BC[b] = np.arange(n - scored, n) >= n - n_scored
      placed = map(self._placed, (inputs_BT, positions_BC, targets_BC, scored_BC))
      logprob_B, greedy_B = jax.device_get(_score(self.params, *placed,
                                                  self.graphdef, vocab, self.mesh, self.rules))
      for b, i in enumerate(batch):
        answers[i] = (float(logprob_B[b]), bool(greedy_B[b]))
      bar.update(len(batch))

  def _degree(self) -> int:
    """How many ways the mesh splits a batch (1 without a mesh)."""
    return 1 if self.mesh is None else sharding.batch_degree(self.mesh, self.rules)

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


@functools.cache
def _task_manager(include_path: str | None):
  """The harness's index of its tasks and those under include_path (built once: it reads thousands of YAMLs)."""
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  return TaskManager(include_path=include_path)


def load_tasks(tasks: list[str], include_path: str | None = None):
  """The harness's TaskManager after checking that each task exists and its data can be read (downloaded once
  into the datasets cache); TaskError names the task that cannot."""
  manager = _task_manager(include_path)
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
