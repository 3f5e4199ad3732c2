"""Writes text with a trained model, streamed as it is decoded.

  python -m gptjax.sample --workdir=runs/quickstart --prompt="The " [--max_new_tokens=200] [--greedy]
  python -m gptjax.sample --workdir=exports/small --prompt_file=prompts.txt --num_samples=3 --top_p=0.9
  python -m gptjax.sample --workdir=hf:gpt2 --prompt="The " --weights=int8

Standard output carries only text (each prompt followed by its continuation), so it can be piped; progress and
speed go to standard error. One sample is printed as it is decoded; several are printed in order when the batch
ends, separated by a line of dashes. The same --seed gives the same text. The decoding choices (padding, buckets,
the sliding window past the context) are in docs/generate.md.
"""

import sys
import time

from absl import flags
from tqdm import tqdm

from gptjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (latest checkpoint) or exported model.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest readable one).")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue ('' = start from end-of-text).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File with one prompt per line, decoded as one batch.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations per prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to write per continuation, at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 200, "Draw among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Draw among the fewest tokens holding this probability (1 = all).")
_GREEDY = flags.DEFINE_bool("greedy", False, "Always take the most likely token (same as --temperature=0).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same text.")
_STOP = flags.DEFINE_multi_string("stop", [], "End a continuation before this string (repeat for several).")
_CHUNK_TOKENS = flags.DEFINE_integer("chunk_tokens", 8, "Tokens decoded between two prints.")
_WEIGHTS = flags.DEFINE_enum("weights", "", ["", "bfloat16", "int8"],
                             "Store the weight matrices narrow while decoding: fewer bytes read per token "
                             "(int8: per-channel scales); '' = as stored.")

SEPARATOR = "\n" + "-" * 15 + "\n"


def main(argv):
  del argv
  from gptjax import generate, loader, paths, quantize
  cli.quiet_libraries()
  if _PROMPT_FILE.value:
    with paths.open_text(_PROMPT_FILE.value) as f:
      prompts = [line.rstrip("\n") for line in f if line.strip()]
  else:
    prompts = [_PROMPT.value]
  loaded = loader.load_model(_WORKDIR.value, step=_STEP.value)
  tokenizer = loaded.tokenizer
  sampling = generate.Sampling(0.0 if _GREEDY.value else _TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
                               vocab_limit=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
  rows = [p for p in prompts for _ in range(_NUM_SAMPLES.value)]
  texts = list(rows)
  live = len(rows) == 1  # one sample is printed as it comes; several would interleave
  if live:
    print(rows[0], end="", flush=True)
  params = quantize.quantize(loaded.params, _WEIGHTS.value)
  weights = f" | weights {_WEIGHTS.value} ({quantize.weight_bytes(params) / 2**20:.1f} MiB)" if _WEIGHTS.value else ""
  print(f"step {loaded.step} of {_WORKDIR.value}: {len(rows)} x {_MAX_NEW_TOKENS.value} tokens{weights}",
        file=sys.stderr)
  bar = tqdm(total=_MAX_NEW_TOKENS.value, desc="sample", unit="token", disable=live, file=sys.stderr)
  start, decoded = time.perf_counter(), 0
  for deltas, decoded in generate.stream_text(params, loaded.graphdef, tokenizer, prompts,
                                              _MAX_NEW_TOKENS.value, sampling, _SEED.value, _NUM_SAMPLES.value,
                                              _CHUNK_TOKENS.value, _STOP.value):
    texts = [t + d for t, d in zip(texts, deltas)]
    bar.update(decoded - bar.n)
    if live:
      print(deltas[0], end="", flush=True)
  bar.close()
  seconds = time.perf_counter() - start
  print("" if live else SEPARATOR.join(texts), flush=True)
  print(f"{len(rows)} x {decoded} tokens in {seconds:.1f} s: {len(rows) * decoded / seconds:.1f} tokens/s "
        "(compilation included)", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
