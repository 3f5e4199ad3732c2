"""GPT-2 in Flax NNX, read top-down: attention, MLP, block, GPT; GPT-2 initialisation; FLOPs per token.

Every parameter carries logical axis names in its `axes` metadata (e.g. ('embed', 'mlp')); `sharding.py`
maps them to mesh axes. Shape suffixes: B batch, T query positions, S key positions, D n_embd, N heads,
H head size, F MLP width, V vocabulary, L layers, M = B*T (rows: batch and time flattened, in projections),
Z = B*N (batch and heads flattened, in the KV cache).

Decoding (`GPT.extend`) runs new tokens against a KV cache of static length; `gptjax/generate.py` drives it.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gptjax import attention, config as config_lib, sharding

# The residual stream [B, T, D] between blocks: split over the batch only (D stays whole on each device).
ACTIVATION_AXES = ("batch", None, None)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """The model's shape and numerics; built from `config.model` by `GPTConfig.from_config`."""
  vocab_size: int
  n_layer: int = 12
  n_head: int = 12
  n_embd: int = 768
  block_size: int = 1024
  bias: bool = True
  dropout: float = 0.0
  ln_eps: float = 1e-5
  dtype: str = "float32"
  attention: str = "xla"
  scan_layers: bool = True
  remat: str = "none"
  row_groups: int = 1
  # The platform the model is lowered for ('tpu', 'cuda', 'cpu'; '' = this process's): picks 'auto' attention's
  # kernel and whether splash runs as a Mosaic kernel or interpreted. Not a config field: `for_device` sets it.
  platform: str = ""
  # Low-rank adapters on the projections named in adapter_targets (qkv, out, fc, proj; wte: the token embedding
  # and the head tied to it), computed in the forward pass beside the frozen kernels: 'lora' adds
  # (alpha / r)·(x·A)·B, 'adalora' (alpha / r)·((x·P)·Λ)·Q. Not config fields: fine-tuning sets them from its
  # `lora` section.
  adapter: str = ""
  adapter_rank: int = 0
  adapter_alpha: float = 16.0
  adapter_targets: tuple[str, ...] = ()

  @classmethod
  def from_config(cls, model_config, vocab_size: int) -> "GPTConfig":
    fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "platform", "adapter", "adapter_rank",
                                                         "adapter_alpha", "adapter_targets"}
    # A config saved before a field existed (an export, a fine-tuned model's base) gets the field's default.
    return cls(vocab_size=vocab_size, **{k: model_config[k] for k in fields if k in model_config})

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  def for_device(self, mesh=None, lengths=(), rules=config_lib.DEFAULT_RULES) -> "GPTConfig":
    """This config with `attention` resolved once for this device and sequences of `lengths` (default
    block_size): a fused kernel 'auto' picked that does not compile there falls back to 'xla' (attention.choose).
    The mesh's devices decide the platform, so a mesh of a TPU slice's compile-only devices builds the TPU program."""
    kernel = attention.choose(self.attention, self.dtype, self.n_head, self.head_dim, lengths or (self.block_size,),
                              mesh, rules)
    return dataclasses.replace(self, attention=kernel, platform=attention.mesh_platform(mesh))


def _normal(std):
  return nnx.initializers.normal(stddev=std)


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.n_embd, epsilon=cfg.ln_eps, use_bias=cfg.bias, dtype=cfg.dtype, rngs=rngs,
                       scale_metadata={"axes": ("embed",)}, bias_metadata={"axes": ("embed",)})


def _param(rngs, init, shape, axes):
  return nnx.Param(init(rngs.params(), shape, jnp.float32), axes=axes)


def low_rank_update(a_RI: jax.Array, b_RO: jax.Array, e_R: jax.Array | None, scale: float) -> jax.Array:
  """An adapter's dense update scale·Aᵀ·B (AdaLoRA: scale·P·diag(Λ)·Q), [..., I, O]; leading axes stack layers."""
  a_RI = a_RI if e_R is None else a_RI * e_R[..., :, None]
  return scale * jnp.matmul(jnp.swapaxes(a_RI, -1, -2), b_RO)


class LowRank(nnx.Module):
  """The adapter of one projection [I, O]: x -> (alpha / r)·(x·Aᵀ)·B, A [r, I], B [r, O] (LoRA; B starts at zero,
  so the adapted model starts as the base), or (alpha / r)·((x·P)·Λ)·Q (AdaLoRA, as peft: P, Q ~ N(0, 0.02), Λ
  zeros; a pruned rank has Λ = 0; Pᵀ is stored in `a`). Replicated: adapters are small."""

  def __init__(self, cfg: GPTConfig, n_in: int, n_out: int, rngs: nnx.Rngs):
    r = cfg.adapter_rank
    self.scale = cfg.adapter_alpha / r
    a_std = 0.02 if cfg.adapter == "adalora" else 1 / math.sqrt(n_in)
    # A is stored [r, I] (peft's lora_A layout): its gradient is then an [r, I] product, which XLA:CPU runs 2-3x
    # faster than the [I, r] one (measured at 2048 x 3072, r = 8).
    self.a = _param(rngs, _normal(a_std), (r, n_in), (None, None))
    b_init = _normal(0.02) if cfg.adapter == "adalora" else nnx.initializers.zeros
    self.b = _param(rngs, b_init, (r, n_out), (None, None))
    self.e = _param(rngs, nnx.initializers.zeros, (r,), (None,)) if cfg.adapter == "adalora" else None

  def _a(self) -> jax.Array:
    """scale·A [r, I] (AdaLoRA: scale·Λ·Pᵀ)."""
    a_RI = self.scale * self.a[...]
    return a_RI if self.e is None else a_RI * self.e[...][:, None]

  def rows(self, ids_BT: jax.Array) -> jax.Array:
    """The adapter of an embedding table [I = V, O = D] at token ids: the delta's rows, never the dense delta."""
    return jnp.take(self._a().T, ids_BT, axis=0) @ self.b[...]

  def dense(self) -> jax.Array:
    """The dense update [I, O] that merging adds to the kernel."""
    return low_rank_update(self.a[...], self.b[...], None if self.e is None else self.e[...], self.scale)

  def __call__(self, x_BTI: jax.Array) -> jax.Array:
    # As 2-D [B*T, I] matmuls: the gradient of A then contracts one axis, not (B, T), which XLA:CPU runs ~10x
    # slower (measured: LoRA on the MLP cost as much as full fine-tuning).
    dtype, lead = x_BTI.dtype, x_BTI.shape[:-1]
    x_NR = jax.lax.dot_general(x_BTI.reshape(-1, x_BTI.shape[-1]), self._a().astype(dtype), (((1,), (1,)), ((), ())))
    return (x_NR @ self.b[...].astype(dtype)).reshape(*lead, -1)


def _adapter(cfg: GPTConfig, target: str, n_in: int, n_out: int, rngs: nnx.Rngs) -> LowRank | None:
  return LowRank(cfg, n_in, n_out, rngs) if cfg.adapter and target in cfg.adapter_targets else None


def _rows(fn, x_BT_: jax.Array) -> jax.Array:
  """fn over x's batch and time flattened into one row axis M = B*T ([B, T, ...] -> [M, ...] -> back).

  Projections take rows so that a kernel's gradient is a matmul contracting one axis (M), not two (B, T): for the
  two-axis one XLA:CPU's layout assignment first transposes the activation's cotangent (a strided copy as long as
  the matmul; benchmarks/RESULTS.md has the baby GPT's step before and after). Merging leading axes is free on every
  backend and keeps a split over the batch.
  """
  B, T = x_BT_.shape[:2]
  y_M_ = fn(x_BT_.reshape(B * T, *x_BT_.shape[2:]))
  return y_M_.reshape(B, T, *y_M_.shape[1:])


class LayerCache(NamedTuple):
  """One layer's keys and values at every cache slot, [Z, S, H] each (see `attention.cached_attention`)."""
  k_ZSH: jax.Array
  v_ZSH: jax.Array


class CacheWrite(NamedTuple):
  """Where `GPT.extend` puts new tokens in a layer's cache (slots start..start+T-1) and what each may see."""
  cache: LayerCache
  start: jax.Array
  mask_BTS: jax.Array


class Attention(nnx.Module):
  """Causal multi-head self-attention; q, k, v come out of one einsum already split into heads."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    D, N, H = cfg.n_embd, cfg.n_head, cfg.head_dim
    # GPT-2 scales the init of residual-stream output projections by 1/sqrt(2 * n_layer).
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    self.qkv_kernel = _param(rngs, _normal(0.02), (D, 3, N, H), ("embed", None, "heads", "head_dim"))
    self.out_kernel = _param(rngs, _normal(proj_std), (N, H, D), ("heads", "head_dim", "embed"))
    if cfg.bias:
      self.qkv_bias = _param(rngs, nnx.initializers.zeros, (3, N, H), (None, "heads", "head_dim"))
      self.out_bias = _param(rngs, nnx.initializers.zeros, (D,), ("embed",))
    self.qkv_adapter = _adapter(cfg, "qkv", D, 3 * N * H, rngs)
    self.out_adapter = _adapter(cfg, "out", N * H, D, rngs)

  def __call__(self, x_BTD: jax.Array, write: CacheWrite | None = None) -> tuple[jax.Array, LayerCache | None]:
    """(y_BTD, None) causally over x alone; with `write`, over the cache too: (y_BTD, the updated cache)."""
    if write is None and attention.resolve(self.cfg.attention, x_BTD.dtype, self.cfg.platform) == "pallas":
      return self._heads_major(x_BTD), None
    with jax.named_scope("attention_projections"):
      qkv_BT3NH = self._qkv(x_BTD)
    with jax.named_scope("attention"):
      y_BTNH, cache = self._attend(qkv_BT3NH, write)
    with jax.named_scope("attention_projections"):
      return self._out(y_BTNH), cache

  def _heads_major(self, x_BTD: jax.Array) -> jax.Array:
    """Attention for splash, whose kernel reads [B, N, T, H]: q, k and v are projected straight into that layout
    and the output projected straight out of it, so that no tensor of the block is moved between layouts around the
    kernel (TPU compiler, GPT-2 small on v5e-1: 0.4 GB fewer bytes per layer per micro-batch of 8 x 1024)."""
    (B, T, D), dtype = x_BTD.shape, x_BTD.dtype
    N, H = self.cfg.n_head, self.cfg.head_dim
    with jax.named_scope("attention_projections"):
      qkv_3BNTH = jnp.einsum("btd,dcnh->cbnth", x_BTD, self.qkv_kernel[...].astype(dtype))
      if self.cfg.bias:
        qkv_3BNTH = qkv_3BNTH + self.qkv_bias[...].astype(dtype)[:, None, :, None, :]
      if self.qkv_adapter is not None:
        qkv_3BNTH = qkv_3BNTH + self.qkv_adapter(x_BTD).reshape(B, T, 3, N, H).transpose(2, 0, 3, 1, 4)
      qkv_3BNTH = checkpoint_name(qkv_3BNTH, "qkv")
    with jax.named_scope("attention"):
      y_BNTH = attention.causal_attention_heads_major(qkv_3BNTH, self.cfg.platform)
    with jax.named_scope("attention_projections"):
      y_BTD = jnp.einsum("bnth,nhd->btd", y_BNTH, self.out_kernel[...].astype(dtype))
      if self.cfg.bias:
        y_BTD = y_BTD + self.out_bias[...].astype(dtype)
      if self.out_adapter is not None:
        y_BTD = y_BTD + self.out_adapter(y_BNTH.transpose(0, 2, 1, 3).reshape(B, T, N * H))
      return y_BTD

  def _qkv(self, x_BTD: jax.Array) -> jax.Array:
    """q, k and v packed as [B, T, 3, N, H]."""
    (B, T, D), dtype = x_BTD.shape, x_BTD.dtype
    x_MD = x_BTD.reshape(B * T, D)  # rows: see `_rows`
    # As [D, 3, N*H]: one output axis per q/k/v, so the kernel's gradient is one matmul per q/k/v without a
    # transposed copy of the cotangent (N stays the major half of N*H, so a split over heads stays a split).
    kernel = self.qkv_kernel[...].astype(dtype)
    qkv_M3NH = jnp.einsum("md,dck->mck", x_MD, kernel.reshape(D, 3, -1)).reshape(B * T, *kernel.shape[1:])
    if self.cfg.bias:
      qkv_M3NH = qkv_M3NH + self.qkv_bias[...].astype(dtype)
    if self.qkv_adapter is not None:
      qkv_M3NH = qkv_M3NH + self.qkv_adapter(x_MD).reshape(qkv_M3NH.shape)
    return checkpoint_name(qkv_M3NH, "qkv").reshape(B, T, *qkv_M3NH.shape[1:])

  def _attend(self, qkv_BT3NH: jax.Array, write: CacheWrite | None) -> tuple[jax.Array, LayerCache | None]:
    """y_BTNH, and the updated cache when decoding (`write`)."""
    if write is None:
      return attention.causal_attention_qkv(qkv_BT3NH, self.cfg.attention, self.cfg.platform), None
    q_BTNH, k_BTNH, v_BTNH = (qkv_BT3NH[:, :, i] for i in range(3))
    # Written before it is read: XLA then updates the cache in place (read-then-write costs a copy per token).
    cache = LayerCache(*(attention.write_cache(c_ZSH, new_BTNH, write.start)
                         for c_ZSH, new_BTNH in zip(write.cache, (k_BTNH, v_BTNH))))
    return attention.cached_attention(q_BTNH, cache.k_ZSH, cache.v_ZSH, write.mask_BTS), cache

  def _out(self, y_BTNH: jax.Array) -> jax.Array:
    """The output projection [B, T, N, H] -> [B, T, D]."""
    (B, T), dtype, D = y_BTNH.shape[:2], y_BTNH.dtype, self.cfg.n_embd
    y_MNH = y_BTNH.reshape(B * T, *y_BTNH.shape[2:])
    # Contracts (n, h) in storage order; an einsum "mnh,nhd" contracts (h, n), for which XLA transposes the
    # kernel on every call: once per token when decoding.
    y_MD = jax.lax.dot_general(y_MNH, self.out_kernel[...].astype(dtype), (((1, 2), (0, 1)), ((), ())))
    if self.cfg.bias:
      y_MD = y_MD + self.out_bias[...].astype(dtype)
    if self.out_adapter is not None:
      y_MD = y_MD + self.out_adapter(y_MNH.reshape(B * T, -1))
    return y_MD.reshape(B, T, D)


class MLP(nnx.Module):
  """Two linear layers with 4x expansion and tanh-approximated GELU (as GPT-2)."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    D, F = cfg.n_embd, 4 * cfg.n_embd
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    self.fc = nnx.Linear(D, F, use_bias=cfg.bias, dtype=cfg.dtype, kernel_init=_normal(0.02), rngs=rngs,
                         kernel_metadata={"axes": ("embed", "mlp")}, bias_metadata={"axes": ("mlp",)})
    self.proj = nnx.Linear(F, D, use_bias=cfg.bias, dtype=cfg.dtype, kernel_init=_normal(proj_std), rngs=rngs,
                           kernel_metadata={"axes": ("mlp", "embed")}, bias_metadata={"axes": ("embed",)})
    self.fc_adapter = _adapter(cfg, "fc", D, F, rngs)
    self.proj_adapter = _adapter(cfg, "proj", F, D, rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    with jax.named_scope("mlp"):
      return _rows(self._per_row, x_BTD)

  def _per_row(self, x_MD: jax.Array) -> jax.Array:
    h_MF = self.fc(x_MD)
    if self.fc_adapter is not None:
      h_MF = h_MF + self.fc_adapter(x_MD)
    h_MF = jax.nn.gelu(checkpoint_name(h_MF, "mlp_hidden"), approximate=True)
    y_MD = self.proj(h_MF)
    return y_MD if self.proj_adapter is None else y_MD + self.proj_adapter(h_MF)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.ln_2 = _layer_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BTD: jax.Array, dropout_key: jax.Array | None,
               write: CacheWrite | None = None) -> tuple[jax.Array, LayerCache | None]:
    """(x_BTD, None), or with a cache `write` (decoding) (x_BTD, the layer's updated cache)."""
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)

    def residual(x_BTD, y_BTD):
      with jax.named_scope("residual"):
        return x_BTD + self.dropout(y_BTD, deterministic=dropout_key is None, rngs=rngs)
    with jax.named_scope("layer_norm"):
      h_BTD = self.ln_1(x_BTD)
    y_BTD, cache = self.attn(h_BTD, write)
    x_BTD = residual(x_BTD, y_BTD)
    with jax.named_scope("layer_norm"):
      h_BTD = self.ln_2(x_BTD)
    return residual(x_BTD, self.mlp(h_BTD)), cache


# 'qkv_fc' keeps only the two widest projections' outputs (7 of the ~9 activations of width D per token that
# 'dots' keeps): the backward pass then recomputes layer norms, the attention core and GELU, but no projection.
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                   "qkv_fc": jax.checkpoint_policies.save_only_these_names("qkv", "mlp_hidden")}


class GPT(nnx.Module):
  """GPT-2: token + position embeddings, n_layer blocks, final LayerNorm, LM head tied to wte."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=_normal(0.02), rngs=rngs,
                         embedding_metadata={"axes": ("vocab", "embed")})
    self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, embedding_init=_normal(0.02), rngs=rngs,
                         embedding_metadata={"axes": ("context", "embed")})
    if cfg.scan_layers:
      # One Block whose every parameter has a leading layer axis, run by lax.scan: compile time stays flat
      # in depth.
      @nnx.split_rngs(splits=cfg.n_layer)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs):
        return Block(cfg, rngs)
      self.blocks = make_blocks(rngs)
      for _, var in nnx.iter_graph(self.blocks):
        if isinstance(var, nnx.Param):
          var.set_metadata(axes=("layers",) + var.get_metadata()["axes"])
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
    self.ln_f = _layer_norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.wte_adapter = _adapter(cfg, "wte", cfg.vocab_size, cfg.n_embd, rngs)

  def _embed(self, tokens_BT: jax.Array) -> jax.Array:
    x_BTD = self.wte(tokens_BT)
    return x_BTD if self.wte_adapter is None else x_BTD + self.wte_adapter.rows(tokens_BT)

  def head_embedding(self) -> jax.Array:
    """The tied LM head's weight [V, D]: wte, plus its adapter's dense update when wte is adapted."""
    wte_VD = self.wte.embedding[...]
    return wte_VD if self.wte_adapter is None else wte_VD + self.wte_adapter.dense()

  def __call__(self, tokens_BT: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """Final hidden states h_BTD (after ln_f); `logits(h)` or a fused loss turns them into predictions."""
    cfg = self.cfg
    T = tokens_BT.shape[1]
    if T > cfg.block_size:
      raise ValueError(f"sequence length {T} exceeds the model's block_size {cfg.block_size}.")
    with jax.named_scope("embedding"):
      x_BTD = sharding.constrain((self._embed(tokens_BT) + self.wpe.embedding[:T]).astype(cfg.dtype), ACTIVATION_AXES)
    if dropout_key is not None and cfg.dropout > 0:
      embed_key, dropout_key = jax.random.split(dropout_key)
      x_BTD = self.dropout(x_BTD, rngs=nnx.Rngs(dropout=embed_key))
    else:
      dropout_key = None
    B = x_BTD.shape[0]
    groups = math.gcd(cfg.row_groups, B)
    if groups == 1:
      x_BTD = self._blocks(x_BTD, dropout_key)
    else:
      # Row b in group b % groups (strided: a batch split over devices stays split the same way in every group).
      x_RGTD = x_BTD.reshape(B // groups, groups, *x_BTD.shape[1:])
      keys = [None if dropout_key is None else jax.random.fold_in(dropout_key, g) for g in range(groups)]
      x_RGTD = jnp.stack([self._blocks(x_RGTD[:, g], keys[g]) for g in range(groups)], axis=1)
      x_BTD = x_RGTD.reshape(x_BTD.shape)
    with jax.named_scope("final_norm"):
      return self.ln_f(x_BTD)

  def _blocks(self, x_BTD: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
    """The residual stream after every block."""
    cfg = self.cfg
    layer_keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.n_layer)

    def run_block(block, x_BTD, key):
      return sharding.constrain(block(x_BTD, key)[0], ACTIVATION_AXES)
    if cfg.remat != "none":
      run_block = nnx.remat(run_block, policy=_REMAT_POLICIES[cfg.remat])

    if cfg.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)

      def body(x_BTD, layer):
        params, key = layer
        return run_block(nnx.merge(graphdef, params), x_BTD, key), None
      x_BTD, _ = jax.lax.scan(body, x_BTD, (stacked, layer_keys))
    else:
      for i, block in enumerate(self.blocks):
        x_BTD = run_block(block, x_BTD, None if layer_keys is None else layer_keys[i])
    return x_BTD

  def init_cache(self, batch: int, length: int) -> tuple[LayerCache, ...]:
    """An empty KV cache for `batch` rows of `length` slots: per layer, zeros [batch * n_head, length, H]."""
    cfg = self.cfg
    shape = (batch * cfg.n_head, length, cfg.head_dim)
    return tuple(LayerCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.n_layer))

  def extend(self, tokens_BT: jax.Array, cache: tuple[LayerCache, ...], start: jax.Array,
             pad_B: jax.Array) -> tuple[jax.Array, tuple[LayerCache, ...]]:
    """Runs tokens at cache slots start..start+T-1 of left-padded rows (row b's text begins at slot pad_B[b]).

    Returns h_BTD (after ln_f) and the cache with the new keys and values. Slots before `start` must hold
    the row's earlier tokens; a row's token at slot s has position s - pad_B[b].
    """
    cfg = self.cfg
    T, S = tokens_BT.shape[1], cache[0].k_ZSH.shape[1]
    slots_T = start + jnp.arange(T)
    # Padding slots reuse position 0: no real token ever attends to them.
    positions_BT = jnp.maximum(slots_T[None, :] - pad_B[:, None], 0)
    x_BTD = (self._embed(tokens_BT) + self.wpe.embedding[positions_BT]).astype(cfg.dtype)
    keys_S = jnp.arange(S)
    # A token sees its row's text up to itself; a padding slot sees only itself, which keeps it finite.
    mask_BTS = (keys_S <= slots_T[:, None]) & ((keys_S >= pad_B[:, None, None]) | (keys_S == slots_T[:, None]))
    new_cache = []
    for block, layer_cache in zip(self._layers(), cache):
      x_BTD, layer_cache = block(x_BTD, None, CacheWrite(layer_cache, start, mask_BTS))
      new_cache.append(layer_cache)
    return self.ln_f(x_BTD), tuple(new_cache)

  def _layers(self) -> list[Block]:
    """The blocks one at a time; a scanned model's are slices of its stacked parameters."""
    if not self.cfg.scan_layers:
      return list(self.blocks)
    graphdef, stacked = nnx.split(self.blocks)
    return [nnx.merge(graphdef, layer) for layer in _per_layer(stacked, self.cfg.n_layer)]

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """LM head tied to the token embedding; float32 logits over the padded vocabulary."""
    return jnp.einsum("btd,vd->btv", h_BTD, self.head_embedding().astype(h_BTD.dtype),
                      preferred_element_type=jnp.float32)


def describe_execution(cfg: GPTConfig) -> str:
  """How the run computes its model, for the start-up summary: the attention kernel, and row groups if any."""
  return f"attention {cfg.attention}" + (f" | row groups {cfg.row_groups}" if cfg.row_groups > 1 else "")


def _per_layer(stacked, n_layer: int) -> list:
  """Layer i's slice of every array in a tree of layer-stacked arrays, for each i."""
  return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n_layer)]


@functools.cache
def _graphdef(cfg: GPTConfig):
  return nnx.split(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))))[0]


def unstack_layers(graphdef, params):
  """(graphdef, params) of the same model with scan_layers=False: one array per layer (a copy if stacked).

  Decoding wants this layout: on XLA:CPU, slicing a layer out of stacked weights inside the decode loop copies
  it for every token (measured 2x slower at GPT-2 small, batch 1).
  """
  cfg = nnx.merge(graphdef, params).cfg
  if not cfg.scan_layers:
    return graphdef, params
  params = dict(params)
  params["blocks"] = dict(enumerate(_per_layer(params["blocks"], cfg.n_layer)))
  return _graphdef(dataclasses.replace(cfg, scan_layers=False)), params


def count_params(state, exclude_position: bool = False) -> int:
  """Parameters in a model state; GPT-2 convention excludes position embeddings from FLOPs counts."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if exclude_position and any(getattr(k, "key", None) == "wpe" for k in path):
      continue
    total += leaf.size
  return total


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6N for the matmuls (LM head included) + 12*L*T*D for attention scores."""
  return 6 * n_params + 12 * cfg.n_layer * seq_len * cfg.n_embd
