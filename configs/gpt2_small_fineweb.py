"""GPT-2 124M reproduced as llm.c does it: 10B tokens of FineWeb, with HellaSwag measured during training.

  python -m gptjax.main --config=configs/gpt2_small_fineweb.py --workdir=gs://BUCKET/gpt2_124m

llm.c's recipe (karpathy/llm.c, `scripts/run_gpt2_124M.sh`): GPT-2 small at context 1024, 524,288 tokens per
step (batch 512), peak learning rate 6e-4 after 700 warm-up steps, weight decay 0.1, 19,073 steps = 10B tokens,
GPT-2's tokenizer; the rest is gptjax's GPT-2 config (AdamW 0.9/0.95, clipping 1.0, cosine decay to 6e-5), in
bfloat16 with FSDP over every device.
Data: FineWeb's 10B-token sample streamed from the Hugging Face Hub (the `hf` extra and a network), or llm.c's
prepared shards (`--config.data.path=fineweb10B`: the directory `dev/data/fineweb.py` writes, read in place).
GPT-2's tokenizer files come from the `gpt2` model on the Hub (README, "Reproduce GPT-2 124M"). HellaSwag runs
through lm-evaluation-harness (the `eval` extra) every 500 steps on its 10,042 validation examples.
"""

from gptjax.config import gpt2_config


def get_config(arg=None):
  del arg
  c = gpt2_config("small")
  # Accelerators compute bfloat16 fast; the parameters and optimizer state stay float32, sharded over every chip.
  c.model.dtype = "bfloat16"
  c.mesh.update(data=1, fsdp=-1)
  c.data.update(path="hf:HuggingFaceFW/fineweb:sample-10BT", tokenizer="gpt2", tokenizer_path="gpt2_tokenizer",
                vocab_size=50257)
  c.train.update(warmup_steps=700, eval_every=250, eval_batches=20)
  c.eval.update(harness_tasks="hellaswag", harness_every=500, harness_batch_size=64)
  c.checkpoint.every_steps = 500
  return c
