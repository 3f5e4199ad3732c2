"""Prepares a config's data ahead of training: `python -m gptjax.prepare --config=configs/gpt2_small.py
--config.data.path='corpus/**/*.jsonl' [--workdir=runs/small]`.

Thin entry point: trains or loads the tokenizer and writes the token shards where `gptjax.main` with the same
config and workdir finds them (<workdir>/data, or data.cache_dir). Re-running skips what is done and resumes an
interrupted run after its last finished shard.
"""

from gptjax import cli

_CONFIG, _WORKDIR = cli.define_config_flags("Run directory whose data/ receives the tokenizer and token shards")


def main(argv):
  del argv
  cli.quiet_libraries()
  from gptjax import data  # after flag parsing, as in gptjax.main
  # No config_lib.validate: data is often prepared on a machine other than the one (mesh) that trains.
  prepared = data.prepare(_CONFIG.value, cli.workdir(_WORKDIR))
  tok = prepared.tokenizer
  print(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens, fingerprint {tok.fingerprint}")
  print(f"train: {prepared.train_tokens:,} tokens in {prepared.train_path}")
  print(f"val:   {prepared.val_tokens:,} tokens in {prepared.val_path}")


if __name__ == "__main__":
  cli.run(main)
