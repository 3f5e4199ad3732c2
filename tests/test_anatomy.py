"""gptjax.anatomy: a compiled program's instructions costed one by one and attributed to the step's parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import anatomy, config as config_lib, sharding, train
from gptjax.model import GPTConfig


def test_array_bytes_reads_hlo_types_and_tuples():
  assert anatomy.array_bytes("bf16[8,1024]{1,0:T(8,128)(2,1)}") == 8 * 1024 * 2
  assert anatomy.array_bytes("(f32[8]{0}, pred[2,3]{1,0}, s32[])") == 32 + 6 + 4


def test_part_is_the_innermost_known_scope_forward_and_backward():
  assert anatomy.part_of("jit(f)/jvp(mlp)/dot_general") == "MLP"
  assert anatomy.part_of("jit(f)/transpose(jvp(attention_projections))/md,dck->mck/dot_general") == \
      "attention projections"
  assert anatomy.part_of("jit(f)/optimizer/jit(_where)/select_n") == "optimizer update"
  assert anatomy.part_of("jit(f)/copy") == anatomy.OTHER


def _tiny_step(dtype="float32"):
  config = config_lib.default_config()
  config.model.update(n_layer=1, n_head=2, n_embd=32, block_size=16, dtype=dtype, attention="xla",
                      scan_layers=False)
  config.train.update(batch_size=2, micro_batch_size=0)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  model_cfg = GPTConfig.from_config(config.model, 64)
  tx = train.make_optimizer(config)
  graphdef, state, shardings = train.init_state(config, model_cfg, mesh, tx)
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  tokens = jnp.zeros((1, 2, 17), jnp.int32)
  return step.lower(state, tokens).compile()


def test_instructions_add_up_to_the_compilers_flops_and_name_every_part_and_source_line():
  compiled = _tiny_step()
  instrs = anatomy.instructions(compiled.as_text())
  cost = compiled.cost_analysis()
  # XLA prices each instruction as it prices the whole program: the FLOPs add up exactly, the bytes nearly (the
  # whole-program analysis shares a few fused operands between instructions).
  np.testing.assert_allclose(sum(i.flops for i in instrs), cost["flops"], rtol=1e-6)
  assert 0.8 * cost["bytes accessed"] <= sum(i.bytes for i in instrs) <= 1.2 * cost["bytes accessed"]
  parts = anatomy.by_part(instrs)
  for part in ("embedding", "layer norms", "attention projections", "attention (kernel)", "MLP", "residual adds",
               "LM head + loss", "optimizer update"):
    assert parts[part]["bytes"] > 0, part
  mlp_flops = parts["MLP"]["flops"]
  # fc and proj: 2 x 2 x 32 x 128 FLOPs per token forward, twice that backward, over 2 x 16 tokens.
  assert 3 * 2 * 2 * 32 * 128 * 32 <= mlp_flops <= 1.2 * 3 * 2 * 2 * 32 * 128 * 32
  costliest = max((i for i in instrs if i.part == "LM head + loss"), key=lambda i: i.bytes)
  assert costliest.source.startswith("gptjax/losses.py:")
  assert anatomy.instructions(compiled.as_text()) == instrs  # deterministic


def test_floors_count_weights_once_per_micro_batch_and_the_optimizer_once_per_step():
  cfg = GPTConfig(vocab_size=50304, dtype="bfloat16")
  one, many = anatomy.floors(cfg, 8192, 8192), anatomy.floors(cfg, 8192, 8192 * 64)
  assert many["optimizer update"] == pytest.approx(one["optimizer update"] / 64)
  assert one["gradient accumulation"] == 0 < many["gradient accumulation"]
  assert many["MLP"] == one["MLP"]
  # The MLP of each of 12 layers: both kernels read in bf16 forward and backward (2 x 768 x 3072 x 2 x 2 bytes per
  # 8192 tokens), its hidden activation (3072 wide) written, read, and its gradient written and read (4 x 2 bytes).
  assert many["MLP"] == 12 * (2 * 768 * 3072 * 4 / 8192 + 4 * 3072 * 2)
