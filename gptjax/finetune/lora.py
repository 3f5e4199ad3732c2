"""Low-rank adapters as trainable parameters beside a frozen base, and merging them into the base for export.

The model computes the adapters in its forward pass (`gptjax.model.LowRank`, enabled by GPTConfig.adapter*):
autodiff then never forms a gradient for a frozen kernel, and no merged kernel exists during training. The
adapters live in the model's parameter tree next to their kernel (`attn/qkv_adapter/{a, b[, e]}` beside
`attn/qkv_kernel`); this module splits that tree into (adapters, base), joins it again, and folds the adapters into
the kernels (`merge`) when a merged model is written. Scanned models stack adapters on the layer axis too.
"""

import dataclasses

import jax
from flax import nnx

from gptjax.config import ConfigError
from gptjax.model import low_rank_update

# Target name -> (the adapter's key, the path of its kernel from the same module). Einsum kernels (qkv [D, 3, N, H],
# out [N, H, D]) are seen as matrices [inputs, outputs] in storage order, as the model's adapters see them; the token
# embedding [V, D] as a matrix from one-hot tokens (peft's LoRA on an Embedding), which the tied head shares.
TARGETS = {
    "wte": ("wte_adapter", ("wte", "embedding")),
    "qkv": ("qkv_adapter", ("qkv_kernel",)),
    "out": ("out_adapter", ("out_kernel",)),
    "fc": ("fc_adapter", ("fc", "kernel")),
    "proj": ("proj_adapter", ("proj", "kernel")),
}
METHODS = ("lora", "adalora")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The adapters' method ('lora' or 'adalora'), rank r, scale numerator alpha (updates are scaled by alpha / r)
  and target projections."""
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("qkv", "out", "fc", "proj")
  method: str = "lora"

  def model(self, model_cfg):
    """The model config with these adapters in its forward pass."""
    return with_adapters(model_cfg, self.method, self.rank, self.alpha, self.targets)

  @classmethod
  def of(cls, lo) -> "LoraConfig | None":
    """The adapters a config's `lora` section asks for; None for full fine-tuning (rank 0)."""
    if lo.rank == 0:
      return None
    return cls(rank=lo.rank, alpha=lo.alpha, targets=parse_targets(lo.targets), method=lo.get("method", "lora"))


def parse_targets(targets: str) -> tuple[str, ...]:
  """'qkv, out' -> ('qkv', 'out')."""
  return tuple(name.strip() for name in targets.split(",") if name.strip())


def validate(lo) -> None:
  """ConfigErrors naming the `lora` section's field and the fix (AdaLoRA's phases against the run's steps are
  checked once the steps are known: `tasks.check_schedule`)."""
  if lo.rank < 0:
    raise ConfigError(f"lora.rank={lo.rank}: use 0 (full fine-tuning) or a positive rank.")
  if lo.method not in METHODS:
    raise ConfigError(f"lora.method={lo.method!r}: use one of {METHODS}.")
  if lo.rank == 0:
    return
  targets = parse_targets(lo.targets)
  unknown = [name for name in targets if name not in TARGETS]
  if unknown or not targets:
    raise ConfigError(f"lora.targets={lo.targets!r}: {unknown or 'no target'} not among {list(TARGETS)}; "
                      "give a comma-separated list of them, e.g. 'qkv,out,fc,proj'.")
  if lo.alpha <= 0:
    raise ConfigError(f"lora.alpha={lo.alpha} must be positive (updates are scaled by alpha / rank).")
  if lo.method == "adalora":
    if not 0 < lo.target_r <= lo.rank:
      raise ConfigError(f"lora.target_r={lo.target_r} must be in 1..lora.rank={lo.rank} (AdaLoRA prunes from rank "
                        "down to target_r); set lora.rank > 0, e.g. 12, and target_r <= it.")
    if lo.tinit < 0 or lo.tfinal < 0 or lo.deltaT < 1:
      raise ConfigError(f"lora.tinit={lo.tinit}, lora.tfinal={lo.tfinal}, lora.deltaT={lo.deltaT}: need tinit >= 0, "
                        "tfinal >= 0 (steps) and deltaT >= 1 (steps between rank allocations).")
    for name in ("beta1", "beta2"):
      if not 0 <= lo[name] < 1:
        raise ConfigError(f"lora.{name}={lo[name]} must be in [0, 1) (an EMA rate).")


def check(targets, rank: int, method: str = "lora") -> None:
  """ValueError naming the bad setting and the fix."""
  unknown = sorted(set(targets) - set(TARGETS))
  if unknown or not targets:
    raise ValueError(f"LoRA targets {list(targets)} must be a non-empty subset of {list(TARGETS)}; "
                     f"{unknown or 'none'} are not.")
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
  if method not in METHODS:
    raise ValueError(f"lora.method={method!r}: use one of {METHODS}.")


def with_adapters(model_cfg, method: str, rank: int, alpha: float, targets):
  """The model config with adapters of `rank` on `targets` (validated)."""
  check(targets, rank, method)
  return dataclasses.replace(model_cfg, adapter=method, adapter_rank=rank, adapter_alpha=alpha,
                             adapter_targets=tuple(targets))


def is_adapter(key) -> bool:
  """Whether a parameter-tree key names an adapter (`qkv_adapter`, ...)."""
  return str(key).endswith("_adapter")


def partition(params: dict) -> tuple[dict, dict]:
  """(adapters, base): the parameter tree split into two trees of the same nesting, adapters on one side."""
  adapters, base = {}, {}
  for key, value in params.items():
    if is_adapter(key):
      adapters[key] = value
    elif isinstance(value, dict):
      inner_adapters, base[key] = partition(value)
      if inner_adapters:
        adapters[key] = inner_adapters
    else:
      base[key] = value
  return adapters, base


def combine(base: dict, adapters: dict) -> dict:
  """The full parameter tree from `partition`'s two halves."""
  out = dict(base)
  for key, value in adapters.items():
    out[key] = combine(base[key], value) if key in base and not is_adapter(key) else value
  return out


def init_adapters(model_cfg, key: jax.Array) -> dict:
  """Fresh adapters for a model config with adapters (the base parameters are traced away, never allocated)."""
  from gptjax.model import GPT  # pylint: disable=import-outside-toplevel  # finetune sits above the model
  return jax.jit(lambda k: partition(nnx.to_pure_dict(nnx.state(GPT(model_cfg, nnx.Rngs(k)))))[0])(key)


def delta(adapter: dict, scale: float) -> jax.Array:
  """The dense update of a stored adapter {a, b[, e]}, [..., in, out] (the model's `low_rank_update`)."""
  return low_rank_update(adapter["a"], adapter["b"], adapter.get("e"), scale)


def merge(params: dict, scale: float) -> dict:
  """A tree with adapters (e.g. `combine`'s) as a plain GPT tree: each kernel W + delta, the adapters dropped."""
  out = {}
  for key, value in params.items():
    if is_adapter(key) or not isinstance(value, dict):
      if not is_adapter(key):
        out[key] = value
      continue
    out[key] = merge(value, scale)
  for adapter_key, kernel_path in TARGETS.values():
    if adapter_key not in params:
      continue
    holder = out
    for k in kernel_path[:-1]:
      holder[k] = dict(holder[k])
      holder = holder[k]
    kernel = holder[kernel_path[-1]]
    holder[kernel_path[-1]] = kernel + delta(params[adapter_key], scale).reshape(kernel.shape).astype(kernel.dtype)
  return out


def count(tree) -> int:
  """Number of parameters in a tree (adapters, a head, or both): the trainable count LoRA reports."""
  return sum(leaf.size for leaf in jax.tree.leaves(tree))
