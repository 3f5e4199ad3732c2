"""Where a train step's time goes: forward, backward, LM head + loss, optimizer (an ablation profile).

  python -m benchmarks.step_breakdown --config=configs/gpt2_small.py --batch=8 --seq=128

Each part is jitted and timed on its own (median of --steps runs); 'optimizer + rest' is the full step minus
forward+backward. The LM head row times h -> logits -> cross-entropy and its gradients alone.
"""



import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from benchmarks.common import median, report, time_calls
from gptjax import config as config_lib, losses, sharding, train
from gptjax.model import GPTConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt2_small.py", "Model config.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed runs of each part.")


def main(argv):
  del argv
  config = _CONFIG.value
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  batch, seq = _BATCH.value, _SEQ.value
  vocab = config_lib.check_vocab(config, config.data.vocab_size)
  model_cfg = GPTConfig.from_config(config.model, vocab)
  mesh = sharding.make_mesh(config)
  tx = train.make_optimizer(config)
  graphdef, state, shardings = train.init_state(config, model_cfg, mesh, tx)
  params = state["params"]
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, vocab, (batch, seq + 1)), jnp.int32)
  dtype = jnp.dtype(model_cfg.dtype)
  h = jax.random.normal(jax.random.key(0), (batch, seq, model_cfg.n_embd), dtype)
  wte = params["wte"]["embedding"]

  forward = jax.jit(lambda p, t: train.loss_fn(p, graphdef, t, None))
  forward_backward = jax.jit(jax.value_and_grad(lambda p, t: train.loss_fn(p, graphdef, t, None)))
  head = jax.jit(jax.value_and_grad(lambda h, w, t: losses.lm_cross_entropy(h, w, t), argnums=(0, 1)))
  body = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t[:, :-1]))
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  holder = [state]

  def full_step():
    holder[0], m = step(holder[0], tokens[None])
    jax.block_until_ready(m)
  parts = {
      "forward (loss)": lambda: jax.block_until_ready(forward(params, tokens)),
      "body forward (no head)": lambda: jax.block_until_ready(body(params, tokens)),
      "LM head + loss, fwd+bwd": lambda: jax.block_until_ready(head(h, wte, tokens[:, 1:])),
      "forward + backward": lambda: jax.block_until_ready(forward_backward(params, tokens)),
  }
  times = {}
  for name, fn in parts.items():
    fn()
    times[name] = median(time_calls(fn, _STEPS.value))
  params = None  # the full step donates the state that `params` points into
  full_step()
  times["full step"] = median(time_calls(full_step, _STEPS.value))
  times["optimizer + rest"] = times["full step"] - times["forward + backward"]
  total = times["full step"]
  rows = [(name, f"{t * 1e3:9.1f} ms  {t / total:6.1%}") for name, t in times.items()]
  rows.insert(0, ("shape", f"{config.model.n_layer}L {config.model.n_embd}D vocab {vocab}, batch {batch} x {seq}, "
                           f"{config.model.dtype}, attention={config.model.attention}, "
                           f"scan={config.model.scan_layers}, on {jax.devices()[0].device_kind}"))
  report(rows, {k.replace(" ", "_"): v for k, v in times.items()})


if __name__ == "__main__":
  app.run(main)
