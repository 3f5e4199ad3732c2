"""Causal self-attention kernels behind one switch (`config.model.attention`).

'xla' and 'cudnn' are `jax.nn.dot_product_attention`'s implementations. 'causal_blocks' splits the queries
into blocks and lets each attend only to keys up to its own end, skipping the fully masked upper triangle
that XLA:CPU otherwise computes and throws away (about half the work at long contexts); a sequence of one block
runs `_short_causal`, whose hand-written backward pass suits XLA:CPU. 'pallas' is the TPU
splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), run per device under `shard_map`
(a Mosaic kernel cannot be partitioned by GSPMD); on CPU the same kernel runs in Pallas interpret mode, which
is slow but lets the tests compare it with the reference.

The kernel follows the platform a program is lowered for (`platform`, default this process's): lowering for
'tpu' on a CPU machine (`jax.export`, `python -m gptjax.plan --platform=tpu`) gives splash's Mosaic custom call,
not the interpret-mode HLO. A run resolves 'auto' once with `choose`, which falls back to 'xla' when the fused
kernel 'auto' picked does not compile on the device.

Decoding attends new queries to a KV cache laid out [Z, S, H] with batch and heads flattened (Z = B*N): the
batched dots then read the cache as it is stored. With [B, N, S, H], XLA:CPU reshapes between the in-place
cache update and the dot and so copies the whole cache for every token (benchmarks/RESULTS.md, decoding).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding

from gptjax import config as config_lib, sharding

QUERY_BLOCK = 128
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the (padded) sequence; Mosaic needs multiples of 128


def device_platform() -> str:
  """The platform this process computes on: 'tpu', 'gpu' or 'cpu'."""
  return jax.default_backend()


def mesh_platform(mesh=None) -> str:
  """The platform a program on `mesh` is compiled for: 'tpu' for a TPU slice's devices, also compile-only ones on a
  machine without a TPU (gptjax.tpu), else this process's."""
  if mesh is not None and mesh.devices.flat[0].platform == "tpu":
    return "tpu"
  return device_platform()


def resolve(implementation: str, dtype, platform: str = "") -> str:
  """The kernel for `platform` (default: this process's): 'auto' -> splash attention on TPUs, cuDNN's fused
  kernel on NVIDIA GPUs in half precision, else 'causal_blocks'."""
  platform = platform or device_platform()
  known = config_lib.ATTENTION_KERNELS.get(implementation)
  only_on = known.only_on if known else ()
  if only_on and platform not in only_on:
    raise config_lib.ConfigError(
        f"model.attention={implementation!r} is a {only_on[0].upper()} kernel and the platform is {platform!r}: set "
        "model.attention='auto' (cudnn on NVIDIA GPUs in bfloat16) or 'xla'.")
  if implementation != "auto":
    return implementation
  if platform == "tpu":
    return "pallas"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if platform in ("gpu", "cuda") and half else "causal_blocks"


def choose(implementation: str, dtype, n_head: int, head_dim: int, lengths, mesh=None,
           rules=config_lib.DEFAULT_RULES) -> str:
  """The kernel a run uses on this device: `resolve`'s, except that when 'auto' picked a fused kernel that does
  not compile (forward and backward) for one of the run's sequence lengths, 'xla', with one warning.

  The probe is one sequence per data-parallel shard, placed as the steps place it: the kernels are vmapped over
  the batch, which changes only their grid. An explicit 'pallas' or 'cudnn' is returned as is: its failure stays
  loud.
  """
  platform = mesh_platform(mesh)
  kernel = resolve(implementation, dtype, platform)
  if implementation != "auto" or not config_lib.ATTENTION_KERNELS[kernel].fused:
    return kernel
  if kernel == "pallas":  # splash pads the sequence: one probe per padded length (with its longest T)
    lengths = {_splash_length(T): T for T in sorted(lengths)}.values()
  batch = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in config_lib.batch_axes(rules)]))
  for T in sorted(set(lengths)):
    try:
      _compile_probe(kernel, jax.ShapeDtypeStruct((batch, T, n_head, head_dim), dtype), mesh, rules, platform)
    except Exception as e:  # Mosaic, Triton and cuDNN reject shapes with various exception types
      error = (str(e).strip().splitlines() or [""])[0][:500].rstrip(".")
      logging.warning("model.attention='auto' picked %s (%r), which does not compile on this %s device for "
                      "sequence length %d, %d heads of size %d, %s (batch %d, one row per data-parallel shard): "
                      "%s: %s. Continuing with model.attention='xla'; set it explicitly to skip this check.",
                      config_lib.ATTENTION_KERNELS[kernel].description, kernel, platform, T, n_head, head_dim,
                      jnp.dtype(dtype).name, batch, type(e).__name__, error)
      return "xla"
  return kernel


def _compile_probe(kernel: str, qkv: jax.ShapeDtypeStruct, mesh, rules, platform: str = "") -> None:
  """Compiles the kernel's forward and backward pass for this shape, placed as the train step places it."""
  def loss(q_BTNH, k_BSNH, v_BSNH):
    return causal_attention(q_BTNH, k_BSNH, v_BSNH, kernel, platform).astype(jnp.float32).sum()
  grad = jax.grad(loss, argnums=(0, 1, 2))
  if mesh is not None:
    spec = _rows_and_heads(qkv.shape, mesh, rules)
    qkv = jax.ShapeDtypeStruct(qkv.shape, qkv.dtype, sharding=NamedSharding(mesh, spec))
    grad = sharding.under_mesh(grad, mesh, rules)
  jax.jit(grad).lower(qkv, qkv, qkv).compile()


def causal_attention(q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, implementation: str,
                     platform: str = "") -> jax.Array:
  """softmax(q k^T / sqrt(H) + causal mask) v with the kernel for `platform` (default: this process's); inputs
  and output are [B, T, N, H]."""
  platform = platform or device_platform()
  implementation = resolve(implementation, q_BTNH.dtype, platform)
  if implementation == "causal_blocks":
    return _causal_blocks(jnp.stack([q_BTNH, k_BSNH, v_BSNH], axis=2))
  if implementation == "pallas":
    return _splash(q_BTNH, k_BSNH, v_BSNH, interpret=platform == "cpu")
  return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=True, implementation=implementation)


def causal_attention_qkv(qkv_BT3NH: jax.Array, implementation: str, platform: str = "") -> jax.Array:
  """`causal_attention` of q, k and v packed as the projection makes them, [B, T, 3, N, H]; the output is [B, T, N, H].

  'causal_blocks' takes the packed array (a short sequence then reads and writes it in one piece); the other
  kernels get q, k and v sliced out of it.
  """
  platform = platform or device_platform()
  implementation = resolve(implementation, qkv_BT3NH.dtype, platform)
  if implementation == "causal_blocks":
    return _causal_blocks(qkv_BT3NH)
  return causal_attention(*(qkv_BT3NH[:, :, i] for i in range(3)), implementation, platform)


def _causal_blocks(qkv_BT3NH):
  T = qkv_BT3NH.shape[1]
  if T <= QUERY_BLOCK:
    return _short_causal(qkv_BT3NH)
  q_BTNH, k_BSNH, v_BSNH = (qkv_BT3NH[:, :, i] for i in range(3))
  outputs = []
  for start in range(0, T, QUERY_BLOCK):
    end = min(start + QUERY_BLOCK, T)
    # Query i (absolute position start + i) may see keys 0 .. start + i.
    mask_TS = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
    outputs.append(jax.nn.dot_product_attention(
        q_BTNH[:, start:end], k_BSNH[:, :end], v_BSNH[:, :end], mask=mask_TS[None, None], implementation="xla"))
  return jnp.concatenate(outputs, axis=1)


@jax.custom_vjp
def _short_causal(qkv_BT3NH: jax.Array) -> jax.Array:
  """Causal attention of one short block, [B, T, 3, N, H] -> [B, T, N, H], with a hand-written backward pass.

  As `jax.nn.dot_product_attention` (float32 logits and softmax, probabilities in the values' dtype), but cheaper on
  XLA:CPU, where the baby GPT's attention took a quarter of its train step: q, k and v move to [3, B, N, T, H] in
  one copy (and their gradients back in one), every product is a batched matmul over (B, N), and the softmax's
  backward pass reduces dy·y over H rather than probs·dprobs over the keys (the same sums, FlashAttention's form).
  """
  return _short_causal_fwd(qkv_BT3NH)[0]


def _short_causal_fwd(qkv_BT3NH):
  T, H = qkv_BT3NH.shape[1], qkv_BT3NH.shape[-1]
  q_BNTH, k_BNSH, v_BNSH = qkv_BT3NH.transpose(2, 0, 3, 1, 4)
  logits_BNTS = jnp.einsum("bnth,bnsh->bnts", q_BNTH, k_BNSH, preferred_element_type=jnp.float32) * (1 / np.sqrt(H))
  logits_BNTS = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits_BNTS, -jnp.inf)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(v_BNSH.dtype)
  y_BNTH = jnp.einsum("bnts,bnsh->bnth", probs_BNTS, v_BNSH)
  return y_BNTH.transpose(0, 2, 1, 3), (q_BNTH, k_BNSH, v_BNSH, probs_BNTS, y_BNTH)


def _short_causal_bwd(residuals, dy_BTNH):
  q_BNTH, k_BNSH, v_BNSH, probs_BNTS, y_BNTH = residuals
  dy_BNTH = dy_BTNH.transpose(0, 2, 1, 3)
  dv_BNSH = jnp.einsum("bnts,bnth->bnsh", probs_BNTS, dy_BNTH)
  dprobs_BNTS = jnp.einsum("bnth,bnsh->bnts", dy_BNTH, v_BNSH, preferred_element_type=jnp.float32)
  # sum_s probs·dprobs = sum_h dy·y (y = probs·v): the softmax's backward pass without a reduction over the keys.
  rows_BNT1 = jnp.sum(dy_BNTH.astype(jnp.float32) * y_BNTH.astype(jnp.float32), axis=-1, keepdims=True)
  scale = 1 / np.sqrt(q_BNTH.shape[-1])
  dlogits_BNTS = (probs_BNTS.astype(jnp.float32) * (dprobs_BNTS - rows_BNT1) * scale).astype(q_BNTH.dtype)
  dq_BNTH = jnp.einsum("bnts,bnsh->bnth", dlogits_BNTS, k_BNSH)
  dk_BNSH = jnp.einsum("bnts,bnth->bnsh", dlogits_BNTS, q_BNTH)
  return (jnp.stack([dq_BNTH, dk_BNSH, dv_BNSH]).transpose(1, 3, 0, 2, 4),)


_short_causal.defvjp(_short_causal_fwd, _short_causal_bwd)


def _splash(q_BTNH, k_BSNH, v_BSNH, interpret: bool):
  """Splash attention on [B, T, N, H]: moved to the heads-major layout its kernel reads, and back."""
  to_BNTH = lambda x_BTNH: x_BTNH.transpose(0, 2, 1, 3)
  return splash_heads_major(to_BNTH(q_BTNH), to_BNTH(k_BSNH), to_BNTH(v_BSNH), interpret).transpose(0, 2, 1, 3)


def causal_attention_heads_major(qkv_3BNTH: jax.Array, platform: str = "") -> jax.Array:
  """Splash attention of q, k and v projected straight into the layout its kernel reads, [3, B, N, T, H] (see
  `model.Attention`); the output is [B, N, T, H]."""
  return splash_heads_major(*qkv_3BNTH, interpret=(platform or device_platform()) == "cpu")


def splash_heads_major(q_BNTH, k_BNSH, v_BNSH, interpret: bool) -> jax.Array:
  """Splash attention on [B, N, T, H], each device over its own batch rows and heads (as the traced step's rules
  place them)."""
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BNTH, k_BNSH, v_BNSH)
  spec = sharding.logical_to_spec(("batch", "heads", None, None), q_BNTH.shape, sharding.current_rules(), mesh)
  # The kernel's pallas_call does not declare how its outputs vary over the mesh: no vma check.
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
      q_BNTH, k_BNSH, v_BNSH)


def _rows_and_heads(shape_BTNH, mesh, rules):
  """The spec that splits [B, T, N, H] over batch rows and heads (as `rules` place them)."""
  return sharding.logical_to_spec(("batch", None, "heads", None), shape_BTNH, rules, mesh)


def _splash_local(q_BNTH, k_BNSH, v_BNSH, interpret: bool):
  B, N, T, H = q_BNTH.shape
  T_pad = _splash_length(T)
  kernel = _splash_kernel(N, T_pad, interpret)
  padded = lambda x_BNTH: jnp.pad(x_BNTH, ((0, 0), (0, 0), (0, T_pad - T), (0, 0)))
  # The kernel does not scale the logits.
  y_BNTH = jax.vmap(kernel)(padded(q_BNTH * jnp.asarray(1 / np.sqrt(H), q_BNTH.dtype)), padded(k_BNSH),
                            padded(v_BNSH))
  return y_BNTH[:, :, :T]


def _splash_length(T: int) -> int:
  """The sequence length splash runs at: keys padded at the end are never attended (causal) and padded queries
  are cut off, so any T works."""
  return -(-T // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]


@functools.cache
def _splash_kernel(n_head: int, seq: int, interpret: bool):
  """A causal splash-attention kernel for [N, T, H] inputs (one sequence; vmapped over the batch)."""
  block = next(b for b in SPLASH_BLOCKS if seq % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * n_head)
  with jax.ensure_compile_time_eval():  # the mask tables are constants: no tracers in the cached kernel
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def write_cache(cache_ZSH: jax.Array, new_BTNH: jax.Array, start: jax.Array) -> jax.Array:
  """The cache with new_BTNH's T positions written at slots start..start+T-1."""
  B, T, N, H = new_BTNH.shape
  new_ZTH = new_BTNH.transpose(0, 2, 1, 3).reshape(B * N, T, H).astype(cache_ZSH.dtype)
  return jax.lax.dynamic_update_slice_in_dim(cache_ZSH, new_ZTH, start, axis=1)


def cached_attention(q_BTNH: jax.Array, k_ZSH: jax.Array, v_ZSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(H) where mask) v over the cache slots; the output is [B, T, N, H].

  Like `jax.nn.dot_product_attention`: float32 logits and softmax, probabilities in the values' dtype.
  """
  B, T, N, H = q_BTNH.shape
  S = k_ZSH.shape[1]
  q_ZTH = q_BTNH.transpose(0, 2, 1, 3).reshape(B * N, T, H)
  logits_ZTS = jnp.einsum("zth,zsh->zts", q_ZTH, k_ZSH, preferred_element_type=jnp.float32) * (1 / np.sqrt(H))
  logits_BNTS = jnp.where(mask_BTS[:, None], logits_ZTS.reshape(B, N, T, S), -jnp.inf)
  probs_ZTS = jax.nn.softmax(logits_BNTS, axis=-1).reshape(B * N, T, S).astype(v_ZSH.dtype)
  y_ZTH = jnp.einsum("zts,zsh->zth", probs_ZTS, v_ZSH)
  return y_ZTH.reshape(B, N, T, H).transpose(0, 2, 1, 3)
