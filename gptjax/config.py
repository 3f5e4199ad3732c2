"""The default configuration (every field documented) and its validation.

Config files in `configs/` start from `default_config()` and change what they need. Every field can be
overridden on the command line: `--config.train.steps=100`.
"""

import dataclasses
import math

import ml_collections

from gptjax.errors import UserError

# Logical parameter/activation axis -> mesh axis (or None = replicated). Model code names only the logical
# axes; this table is the whole sharding strategy. A dimension that a mesh axis does not divide is replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("context", None),
)

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
  """An attention kernel `model.attention` may name (its implementation: gptjax.attention.causal_attention)."""
  description: str
  # One custom call that may not compile for every shape on the device: 'auto' probes it and falls back to 'xla'.
  fused: bool
  only_on: tuple[str, ...] = ()  # the platforms it runs on when not all: its own, then 'cpu' for tests (interpret)
  custom_call: str = ""  # the custom call that shows it in a lowered program, and how the planner names it
  lowered_as: str = ""


# model.attention's kernels: validation, gptjax.attention ('auto', the fallback) and the planner read this table.
ATTENTION_KERNELS = {
    "xla": AttentionKernel("XLA attention (jax.nn.dot_product_attention)", fused=False),
    "causal_blocks": AttentionKernel("XLA attention over causal query blocks", fused=False),
    "cudnn": AttentionKernel("cuDNN fused attention", fused=True, custom_call="__cudnn$fmha",
                             lowered_as="cudnn (cuDNN fused-attention custom call)"),
    "pallas": AttentionKernel("Pallas splash attention", fused=True, only_on=("tpu", "cpu"),
                              custom_call="tpu_custom_call", lowered_as="pallas splash (Mosaic tpu_custom_call)"),
}


def default_config() -> ml_collections.ConfigDict:
  """GPT-2 small (124M) trained on the built-in offline corpus; other configs override this."""
  return ml_collections.ConfigDict({name: section() for name, section in (
      ("model", _model_section), ("data", _data_section), ("train", _train_section), ("eval", _eval_section),
      ("mesh", _mesh_section), ("checkpoint", _checkpoint_section), ("log", _log_section))})


def _model_section() -> ml_collections.ConfigDict:
  """The model: shape, dtype, attention kernel, remat, dropout."""
  m = ml_collections.ConfigDict()
  # Transformer depth (number of blocks).
  m.n_layer = 12
  # Attention heads per block; n_embd must be a multiple of it.
  m.n_head = 12
  # Residual stream width.
  m.n_embd = 768
  # Context length in tokens (learned position embeddings of this size).
  m.block_size = 1024
  # Model vocabulary; 0 = the tokenizer's vocabulary rounded up to vocab_multiple.
  m.vocab_size = 0
  # Pad the vocabulary to a multiple of this (128 keeps the LM-head matmul aligned); padded ids are never data.
  m.vocab_multiple = 128
  # Biases in linear layers and LayerNorms (GPT-2: True).
  m.bias = True
  # Dropout on embeddings, attention output and MLP output during training.
  m.dropout = 0.0
  # LayerNorm epsilon (GPT-2: 1e-5).
  m.ln_eps = 1e-5
  # Activation/matmul dtype: 'float32' (CPU) or 'bfloat16' (TPU/GPU). Master weights are always float32.
  m.dtype = "float32"
  # Attention kernel (the table: ATTENTION_KERNELS above): 'xla' or 'cudnn' (NVIDIA GPUs, bf16/fp16) for
  # jax.nn.dot_product_attention;
  # 'causal_blocks' (XLA, skips fully masked key blocks: the fastest on CPU at long contexts, benchmarks/RESULTS.md);
  # 'pallas' (TPU: the Pallas splash-attention kernel; on CPU it runs in Pallas interpret mode, for tests only);
  # 'auto' = pallas on TPUs, cudnn on GPUs in half precision, else causal_blocks; a run whose device cannot compile
  # that fused kernel for its shapes warns once and uses 'xla'.
  m.attention = "auto"
  # Run the blocks with lax.scan over stacked weights (fast compiles); False = Python loop.
  m.scan_layers = True
  # Rematerialisation of each block in the backward pass: 'none', 'full', 'dots' (save matmul outputs) or 'qkv_fc'
  # (save only the qkv and MLP-hidden projections: no matmul is recomputed, less memory than 'dots').
  m.remat = "none"
  # Run the batch's rows through the blocks as this many independent groups (row b in group b % row_groups): the
  # groups share no operation until the LM head, so XLA:CPU runs them on its cores at once. For models whose
  # operations are too small to use every core on their own (the baby GPT on a 2-core CPU, not GPT-2 small:
  # benchmarks/RESULTS.md). 1 = off; a batch that row_groups does not divide uses their greatest common divisor.
  m.row_groups = 1
  return m


def _data_section() -> ml_collections.ConfigDict:
  """The corpus, its tokenizer and its token files."""
  d = ml_collections.ConfigDict()
  # Training data: a file, a directory or a glob of text/JSONL/Parquet files or of nanoGPT/llm.c token files;
  # 'hf:NAME[:CONFIG][@SPLIT]' = a Hugging Face dataset, streamed; '' = the built-in offline corpus (Python's docs).
  d.path = ""
  # How to read data.path: 'auto' (by file suffix: .txt/.md text, .jsonl/.json JSON Lines, .parquet, .bin token
  # files, llm.c's by their header), or 'text', 'jsonl', 'parquet', 'nanogpt', 'llmc' for every file.
  d.format = "auto"
  # The JSONL field / Parquet column / dataset field that holds each document's text.
  d.text_field = "text"
  # Read at most this many documents of each corpus (0 = all), e.g. to take a slice of a huge streamed dataset.
  d.max_documents = 0
  # Weighted corpora to train on instead of data.path: 'path1:0.7,path2:0.3' (each a data.path; '' = none).
  d.mixture = ""
  # Tokenizer: 'bpe' or 'unigram' (SentencePiece trained on the corpus), 'char' (one id per character), or
  # 'gpt2' (GPT-2's byte-level BPE from data.tokenizer_path).
  d.tokenizer = "bpe"
  # A directory to load the tokenizer from instead of training one: GPT-2's vocab.json + merges.txt, or a saved
  # tokenizer (a run's tokenizer/). Needed for token files, whose ids only their own tokenizer can read.
  d.tokenizer_path = ""
  # Tokenizer vocabulary size to train (ignored for 'char' and loaded tokenizers).
  d.vocab_size = 8192
  # Fraction of the documents held out for validation (every 1/val_fraction-th document; the tail of each document
  # when there are fewer than 10; the last tokens of token files, cut at an end-of-text).
  d.val_fraction = 0.1
  # Validation data with the same syntax as data.path; '' = split data.val_fraction off the training data.
  d.val_path = ""
  # Where tokenizers and token files are cached; '' = <workdir>/data.
  d.cache_dir = ""
  # Grain worker processes for batch assembly (0 = in the main process).
  d.num_workers = 0
  return d


def _train_section() -> ml_collections.ConfigDict:
  """The optimizer, its schedule, batches and the guards of the steps."""
  t = ml_collections.ConfigDict()
  # Optimizer steps to run.
  t.steps = 5000
  # Global batch in sequences per optimizer step (across all devices and micro-batches).
  t.batch_size = 512
  # Sequences per data-parallel shard per micro-batch; 0 = no gradient accumulation; -1 = the largest that fits
  # in device memory (measured by compiling the step). Accumulation = batch_size / (micro_batch_size * dp degree).
  t.micro_batch_size = 0
  # Peak learning rate after warmup.
  t.learning_rate = 6e-4
  # Learning rate at the end of the cosine decay.
  t.min_learning_rate = 6e-5
  # Linear warmup steps.
  t.warmup_steps = 700
  # Cosine decay length in steps; 0 = train.steps.
  t.decay_steps = 0
  # AdamW moments.
  t.b1 = 0.9
  t.b2 = 0.95
  # Decoupled weight decay, applied to matrices only (not biases, LayerNorms or embeddings).
  t.weight_decay = 0.1
  # Global-norm gradient clipping; 0 disables.
  t.grad_clip = 1.0
  # Seed for initialisation, data order and dropout.
  t.seed = 0
  # Validate every this many steps (and at the end); 0 = only at the end.
  t.eval_every = 500
  # Validation batches per evaluation (each of batch_size sequences).
  t.eval_batches = 20
  # Batches for the final evaluation: 0 = eval_batches, -1 = the whole validation split.
  t.final_eval_batches = 0
  # Wall-clock limit in seconds (0 = none): stop cleanly when exceeded, as on Ctrl-C.
  t.max_seconds = 0.0
  # On a NaN/Inf loss or gradient: 'skip' the update (counted as skipped_steps in the metrics) or 'stop' the
  # run with a checkpoint of the last good parameters.
  t.nonfinite = "stop"
  # Loss spikes: skip an update whose loss or gradient norm exceeds spike_skip times its median over the last
  # spike_window accepted steps (counted as spike_skipped_steps); 0 = off. After spike_max_in_row spikes in a row
  # the run stops with a checkpoint of the last good state. Changes the train state: set it when a run starts.
  t.spike_skip = 0.0
  t.spike_window = 100
  t.spike_max_in_row = 10
  # The random bits of dropout masks: 'threefry' (JAX's default, counter-based), 'rbg' or 'unsafe_rbg' (XLA's
  # RngBitGenerator: cheaper; the same masks on any mesh and after a resume, not the same masks as threefry).
  t.dropout_rng = "threefry"
  # PaLM's z-loss: z_loss * log(Z)^2 added to the loss per token (softmax normaliser Z of the LM head, or of a
  # task's classes), keeping logits from drifting; 0 = off (PaLM: 1e-4).
  t.z_loss = 0.0
  return t


def _eval_section() -> ml_collections.ConfigDict:
  """lm-evaluation-harness tasks during training."""
  ev = ml_collections.ConfigDict()
  # lm-evaluation-harness tasks run on the live parameters during pretraining and SFT (comma-separated harness task
  # names, e.g. 'hellaswag'; the eval extra); logged as harness/<task>/<metric>. '' = none.
  ev.harness_tasks = ""
  # Run them every this many steps and at the end; 0 = never (then harness_tasks must be '').
  ev.harness_every = 0
  # At most this many documents per task; 0 = all (HellaSwag's validation split: 10042).
  ev.harness_limit = 0
  # A directory of task YAML files (local copies of tasks, for machines without a network); '' = none.
  ev.harness_include_path = ""
  # Requests scored or decoded per batch.
  ev.harness_batch_size = 16
  return ev


def _mesh_section() -> ml_collections.ConfigDict:
  """The device mesh and the logical-axis rules."""
  mesh = ml_collections.ConfigDict()
  # Device-mesh degrees; their product must equal the device count. -1 = all remaining devices.
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
  # Logical-axis -> mesh-axis rules (see DEFAULT_RULES).
  mesh.rules = DEFAULT_RULES
  return mesh


def _checkpoint_section() -> ml_collections.ConfigDict:
  """Checkpoints: how often, how many, from where a run starts."""
  ck = ml_collections.ConfigDict()
  # Save every this many steps (and always at the end, on SIGTERM/SIGINT, and on a non-finite stop); 0 = only then.
  ck.every_steps = 1000
  # How many recent checkpoints to keep.
  ck.keep = 3
  # Also keep this many checkpoints with the lowest validation loss (0 = none).
  ck.keep_best = 0
  # Write checkpoints in a background thread (training continues once arrays are copied to host memory).
  ck.async_save = True
  # Start a new run from these weights (a run's workdir or an exported model); ignored when the workdir
  # already has checkpoints, which are resumed instead.
  ck.init_from = ""
  return ck


def _log_section() -> ml_collections.ConfigDict:
  """Metrics, samples and profiles."""
  lg = ml_collections.ConfigDict()
  # Log training metrics every this many steps.
  lg.every_steps = 10
  # Write TensorBoard event files next to metrics.jsonl.
  lg.tensorboard = True
  # Log to Weights & Biases (needs `pip install wandb`).
  lg.wandb = False
  lg.wandb_project = "gptjax"
  # Samples printed at the end of training, and tokens per sample.
  lg.samples = 3
  lg.sample_tokens = 200
  # Prompt for the end-of-training samples ('' = start from end-of-text).
  lg.sample_prompt = ""
  # Profile optimizer steps 'a:b' (a through b, both included, numbered as in metrics.jsonl: step 1 is the first
  # update and includes the compile) with jax.profiler into <workdir>/profile (`tensorboard --logdir <workdir>`,
  # Profile tab; needs `pip install tensorboard-plugin-profile`); '' = no trace. Process 0 only: in a
  # multi-host step every process waits on the same collectives, so one host's timeline shows the step.
  lg.profile_steps = ""
  return lg


class ConfigError(UserError, ValueError):
  """A configuration value that cannot work; the message names the field and the fix."""


def mesh_shape(config, n_devices: int) -> tuple[int, int, int]:
  """Resolves -1 degrees of (data, fsdp, tensor) against the device count."""
  degrees = [int(config.mesh[a]) for a in MESH_AXES]
  free = [i for i, d in enumerate(degrees) if d == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, degrees))}: at most one degree may be -1 (the rest).")
  for a, d in zip(MESH_AXES, degrees):
    if d == 0 or d < -1:
      raise ConfigError(f"mesh.{a}={d}: degrees must be positive, or -1 for the remaining devices.")
  fixed = 1
  for d in degrees:
    fixed *= d if d > 0 else 1
  if free:
    if n_devices % fixed:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, degrees))}: {n_devices} devices are not divisible by the "
                        f"fixed degrees' product {fixed}; choose degrees that divide {n_devices}.")
    degrees[free[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, degrees))} needs {fixed} devices but {n_devices} are present; "
                      f"set one degree to -1 or make their product {n_devices}.")
  return tuple(degrees)


def harness_tasks(config) -> list[str]:
  """The harness task names of eval.harness_tasks."""
  return [t.strip() for t in config.eval.harness_tasks.split(",") if t.strip()]


def batch_axes(rules) -> tuple[str, ...]:
  """The mesh axes `rules` split the batch dimension over (logical axis 'batch')."""
  axes = dict(rules).get("batch") or ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def data_parallel_degree(config, n_devices: int) -> int:
  """How many ways the config's rules split each batch on its mesh (product of the batch axes' degrees)."""
  degrees = dict(zip(MESH_AXES, mesh_shape(config, n_devices)))
  return math.prod(degrees[a] for a in batch_axes(config.mesh.rules))


def grad_accum_steps(config, n_devices: int) -> int:
  """Micro-batches per optimizer step: batch_size / (micro_batch_size * data-parallel degree)."""
  dp = data_parallel_degree(config, n_devices)
  micro = config.train.micro_batch_size
  if micro == -1:
    raise ValueError("train.micro_batch_size=-1 is resolved by gptjax.plan.fit_micro_batch before training.")
  micro = micro or config.train.batch_size // dp
  return config.train.batch_size // (micro * dp)


def validate(config, n_devices: int) -> None:
  """Raises ConfigError naming the field and the fix for any setting that cannot work."""
  m, t = config.model, config.train
  for name in ("n_layer", "n_head", "n_embd", "block_size"):
    if m[name] <= 0:
      raise ConfigError(f"model.{name}={m[name]} must be positive.")
  if m.n_embd % m.n_head:
    raise ConfigError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
                      f"choose n_head among the divisors of {m.n_embd}.")
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1).")
  if m.dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"model.dtype={m.dtype!r}: use 'float32', 'bfloat16' or 'float16'.")
  if m.attention not in ("auto", *ATTENTION_KERNELS):
    raise ConfigError(f"model.attention={m.attention!r}: use 'auto' or one of " + ", ".join(
        f"'{name}' ({k.description}{', ' + ' or '.join(k.only_on) if k.only_on else ''})"
        for name, k in ATTENTION_KERNELS.items()) + ".")
  if m.remat not in ("none", "full", "dots", "qkv_fc"):
    raise ConfigError(f"model.remat={m.remat!r}: use 'none', 'full', 'dots' or 'qkv_fc'.")
  if m.row_groups <= 0:
    raise ConfigError(f"model.row_groups={m.row_groups} must be positive (1 = the batch as one group).")
  if m.vocab_multiple <= 0:
    raise ConfigError(f"model.vocab_multiple={m.vocab_multiple} must be positive (1 = no padding).")
  ev = config.eval
  if ev.harness_every < 0 or ev.harness_limit < 0 or ev.harness_batch_size <= 0:
    raise ConfigError(f"eval.harness_every={ev.harness_every} and eval.harness_limit={ev.harness_limit} must be >= 0 "
                      f"and eval.harness_batch_size={ev.harness_batch_size} positive.")
  if bool(ev.harness_every) != bool(harness_tasks(config)):
    raise ConfigError(f"eval.harness_tasks={ev.harness_tasks!r} and eval.harness_every={ev.harness_every} go "
                      "together: name the tasks and how often to run them, or neither.")
  d = config.data
  if d.tokenizer not in ("bpe", "unigram", "char", "gpt2"):
    raise ConfigError(f"data.tokenizer={d.tokenizer!r}: use 'bpe', 'unigram', 'char' or 'gpt2'.")
  if d.tokenizer == "gpt2" and not d.tokenizer_path:
    raise ConfigError("data.tokenizer='gpt2' is loaded, not trained: set data.tokenizer_path to a directory with "
                      "GPT-2's vocab.json and merges.txt.")
  if d.format not in ("auto", "text", "jsonl", "parquet", "nanogpt", "llmc"):
    raise ConfigError(f"data.format={d.format!r}: use 'auto', 'text', 'jsonl', 'parquet', 'nanogpt' or 'llmc'.")
  if not d.text_field:
    raise ConfigError("data.text_field is empty: name the JSONL field or Parquet column that holds the text.")
  if d.max_documents < 0:
    raise ConfigError(f"data.max_documents={d.max_documents} must be >= 0 (0 = all).")
  if d.mixture and d.path:
    raise ConfigError(f"data.mixture={d.mixture!r} replaces data.path={d.path!r}: set data.path='' (or clear "
                      "data.mixture).")
  if not 0.0 < d.val_fraction < 1.0:
    raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1).")
  if d.num_workers < 0:
    raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0 (0 = batches assembled in this process).")
  if t.nonfinite not in ("skip", "stop"):
    raise ConfigError(f"train.nonfinite={t.nonfinite!r}: use 'skip' or 'stop'.")
  if t.spike_skip and (t.spike_skip <= 1 or t.spike_window < 1 or t.spike_max_in_row < 1):
    raise ConfigError(f"train.spike_skip={t.spike_skip}, spike_window={t.spike_window}, spike_max_in_row="
                      f"{t.spike_max_in_row}: spike_skip is a factor above 1 (0 = off; e.g. 3), the others >= 1.")
  if t.dropout_rng not in ("threefry", "rbg", "unsafe_rbg"):
    raise ConfigError(f"train.dropout_rng={t.dropout_rng!r}: use 'threefry', 'rbg' or 'unsafe_rbg'.")
  if t.spike_skip < 0 or t.z_loss < 0:
    raise ConfigError(f"train.spike_skip={t.spike_skip}, train.z_loss={t.z_loss}: use 0 (off) or a positive value.")
  if config.checkpoint.keep <= 0 or config.checkpoint.keep_best < 0:
    raise ConfigError(f"checkpoint.keep={config.checkpoint.keep} must be >= 1 and checkpoint.keep_best="
                      f"{config.checkpoint.keep_best} >= 0.")
  if t.steps <= 0 or t.batch_size <= 0:
    raise ConfigError(f"train.steps={t.steps} and train.batch_size={t.batch_size} must be positive.")
  if t.warmup_steps < 0 or t.learning_rate <= 0 or t.min_learning_rate < 0:
    raise ConfigError("train.warmup_steps, train.learning_rate and train.min_learning_rate must be >= 0 "
                      "(learning_rate > 0).")
  for name, axes in config.mesh.rules:
    unknown = set(batch_axes([("batch", axes)])) - set(MESH_AXES)
    if unknown:
      raise ConfigError(f"mesh.rules maps {name!r} to {sorted(unknown)}, which are not mesh axes: use names "
                        f"from {MESH_AXES} (or None to replicate).")
  dp = data_parallel_degree(config, n_devices)
  axes = "*".join(f"mesh.{a}" for a in batch_axes(config.mesh.rules)) or "1 (mesh.rules replicate the batch)"
  micro = t.batch_size // max(dp, 1) if t.micro_batch_size in (0, -1) else t.micro_batch_size
  if t.micro_batch_size < -1 or micro <= 0 or t.batch_size % (micro * dp):
    raise ConfigError(
        f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size ({micro}) x the "
        f"data-parallel degree {axes}={dp}; pick batch_size as a multiple of {micro * dp}.")
  profile_range(config)


def profile_range(config) -> tuple[int, int] | None:
  """(first, last) optimizer step of log.profile_steps='a:b', both included; None when it is ''."""
  value = config.log.profile_steps
  if not value:
    return None
  fix = ("use 'a:b' with 1 <= a <= b <= train.steps (optimizer steps a through b, both included), e.g. '10:12', "
         "or '' for no trace")
  first, sep, last = str(value).partition(":")
  try:
    first, last = int(first), int(last)
  except ValueError:
    raise ConfigError(f"log.profile_steps={value!r} is not two step numbers: {fix}.") from None
  if not sep or not 1 <= first <= last:
    raise ConfigError(f"log.profile_steps={value!r}: {fix}.")
  if last > config.train.steps:
    raise ConfigError(f"log.profile_steps={value!r} ends after train.steps={config.train.steps}: {fix}.")
  return first, last


def check_vocab(config, tokenizer_vocab: int) -> int:
  """The model vocabulary for a tokenizer: explicit, or the tokenizer's rounded up to vocab_multiple."""
  m = config.model
  if m.vocab_size == 0:
    return -(-tokenizer_vocab // m.vocab_multiple) * m.vocab_multiple
  if tokenizer_vocab > m.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer_vocab} tokens but model.vocab_size={m.vocab_size}; set "
                      f"model.vocab_size >= {tokenizer_vocab} (or 0 to follow the tokenizer).")
  return m.vocab_size


# (n_layer, n_head, n_embd, peak learning rate) of the GPT-2 family.
GPT2_SIZES = {
    "small": (12, 12, 768, 6e-4),
    "medium": (24, 16, 1024, 3e-4),
    "large": (36, 20, 1280, 2.5e-4),
    "xl": (48, 25, 1600, 2e-4),
}


def gpt2_config(size: str) -> ml_collections.ConfigDict:
  """GPT-2 `size` with its real shape: context 1024, vocab 50257 padded to 50304, ~0.5M tokens per step.

  The micro-batch is fitted to the device's memory at start-up (train.micro_batch_size=-1).
  """
  n_layer, n_head, n_embd, lr = GPT2_SIZES[size]
  c = default_config()
  c.model.update(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50304)
  c.data.vocab_size = 50257  # at most: a small corpus (like the built-in one) supports fewer BPE tokens
  c.train.update(steps=19073, batch_size=512, micro_batch_size=-1, learning_rate=lr, min_learning_rate=lr / 10,
                 warmup_steps=715, weight_decay=0.1, eval_every=250)
  return c
