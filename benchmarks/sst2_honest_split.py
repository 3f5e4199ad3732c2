"""An SST-2 dev set that does not leak: held-out full sentences, none of whose phrases is left in training.

  python -m benchmarks.sst2_honest_split --data=../shared/data/sst2 --out=runs/sst2_honest

SST-2's training rows are phrases of the treebank's sentences, and a random tenth of them (../shared/data's
dev.tsv) mostly reappears inside other training rows: a model can score it by remembering. This script pools
train and dev, finds the full sentences (rows that are no span of a longer row), holds out --dev_size of them
(seeded), and drops from training every row that is a span of a held-out sentence. It prints how much the given
dev leaks and checks that the new split does not.

With --val_size, it also holds out that many further full sentences of the training rows as val.tsv and writes
fit.tsv (train.tsv without the rows inside them): settings are chosen by training on fit.tsv and scoring val.tsv,
so dev.tsv stays a set no choice has seen. train.tsv and dev.tsv do not change with it.
"""

import argparse
import os
import random


def read_rows(path: str) -> list[tuple[str, str]]:
  with open(path, encoding="utf-8") as f:
    next(f)  # header
    return [(text.strip(), label.strip()) for text, label in (line.rstrip("\n").split("\t") for line in f)
            if text.strip()]


def spans(text: str):
  """Every contiguous run of whole words of `text`, itself included."""
  words = text.split()
  return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}


def inside_any(rows: list[str], texts: set[str]) -> set[str]:
  """The texts that are a span (whole words) of some row, other than the row itself."""
  found = set()
  for row in rows:
    found |= (spans(row) - {row}) & texts
  return found


def hold_out(texts, full: list[str], size: int, rng: random.Random) -> tuple[list[str], list[str]]:
  """(training rows, held-out sentences): `size` of the full sentences, and every text that is no span of them."""
  held = set(rng.sample(full, size))
  blocked = set().union(*(spans(s) for s in held))
  kept = sorted(t for t in texts if t not in blocked)
  assert not inside_any(kept, held)  # no shared phrase either way
  return kept, sorted(held)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default="../shared/data/sst2")
  parser.add_argument("--out", default="runs/sst2_honest")
  parser.add_argument("--dev_size", type=int, default=1000)
  parser.add_argument("--val_size", type=int, default=0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  train, dev = read_rows(os.path.join(args.data, "train.tsv")), read_rows(os.path.join(args.data, "dev.tsv"))
  train_texts = {t for t, _ in train}
  verbatim = sum(t in train_texts for t, _ in dev)
  inside = inside_any(list(train_texts), {t for t, _ in dev})
  leaked = sum(t in train_texts or t in inside for t, _ in dev)
  print(f"given dev: {len(dev)} rows; {verbatim} ({verbatim / len(dev):.1%}) are training rows, {leaked} "
        f"({leaked / len(dev):.1%}) are a training row or a span inside one")

  labels = dict(train + dev)  # a text's label (the pooled rows agree on it, or the later one wins)
  texts = set(labels)
  full = sorted(texts - inside_any(list(texts), texts))
  new_train, new_dev = hold_out(texts, full, args.dev_size, random.Random(args.seed))
  splits = [("train.tsv", new_train), ("dev.tsv", new_dev)]
  if args.val_size:
    fit, val = hold_out(new_train, sorted(set(full) & set(new_train)), args.val_size, random.Random(args.seed + 1))
    splits += [("fit.tsv", fit), ("val.tsv", val)]
    print(f"val: {len(val)} more full sentences; fit.tsv keeps {len(fit)} of the {len(new_train)} training rows")
  os.makedirs(args.out, exist_ok=True)
  for name, rows in splits:
    with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
      f.write("sentence\tlabel\n")
      f.writelines(f"{t}\t{labels[t]}\n" for t in rows)
  positive = sum(labels[t] == "1" for t in new_dev) / len(new_dev)
  print(f"{len(full)} full sentences among {len(texts)} distinct rows; held out {len(new_dev)} ({positive:.1%} "
        f"positive); training keeps {len(new_train)} rows (dropped {len(texts) - len(new_dev) - len(new_train)} "
        f"phrases of held-out sentences) -> {args.out}")


if __name__ == "__main__":
  main()
