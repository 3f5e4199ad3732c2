"""How far SST-2's own training rows go without pretraining: a Naive Bayes classifier on word n-grams.

  python -m benchmarks.sst2_ngram_baseline --data=runs/sst2_honest

Trains on <data>/train.tsv (or fit.tsv with --train=fit.tsv) and scores val.tsv and dev.tsv where they share no
row with it (train.tsv holds val's sentences), for n-grams up to 1, 2 and 3 words. A fine-tuned model that only matches this line has learnt what the labelled
phrases say and little from its pretraining; benchmarks/RESULTS.md puts the fine-tuning numbers beside it.
"""

import argparse
import collections
import math
import os

from benchmarks.sst2_honest_split import read_rows


def ngrams(text: str, n: int) -> set[str]:
  """The distinct word n-grams of `text`, of every length 1..n (binary features: a repeat counts once)."""
  words = text.split()
  return {" ".join(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)}


def fit_naive_bayes(rows, n: int, alpha: float = 1.0):
  """A predict(text) -> label of multinomial Naive Bayes with add-`alpha` smoothing over binary n-gram features."""
  counts = {label: collections.Counter() for label in {label for _, label in rows}}
  priors = collections.Counter(label for _, label in rows)
  for text, label in rows:
    counts[label].update(ngrams(text, n))
  vocab = set().union(*counts.values())
  log_prior = {y: math.log(priors[y] / len(rows)) for y in counts}
  log_total = {y: math.log(sum(c.values()) + alpha * len(vocab)) for y, c in counts.items()}

  def log_score(y: str, feats: set[str]) -> float:
    return log_prior[y] + sum(math.log(counts[y][f] + alpha) - log_total[y] for f in feats)

  def predict(text: str) -> str:
    feats = ngrams(text, n) & vocab
    return max(counts, key=lambda y: log_score(y, feats))
  return predict


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default="runs/sst2_honest")
  parser.add_argument("--train", default="train.tsv")
  parser.add_argument("--max_n", type=int, default=3)
  args = parser.parse_args()
  train = read_rows(os.path.join(args.data, args.train))
  train_texts = {text for text, _ in train}
  scored = {name: read_rows(os.path.join(args.data, name)) for name in ("val.tsv", "dev.tsv")
            if os.path.exists(os.path.join(args.data, name))}
  scored = {name: rows for name, rows in scored.items() if not any(text in train_texts for text, _ in rows)}
  for n in range(1, args.max_n + 1):
    predict = fit_naive_bayes(train, n)
    for name, rows in scored.items():
      accuracy = sum(predict(text) == label for text, label in rows) / len(rows)
      print(f"n-grams up to {n}: trained on {args.train} ({len(train)} rows) -> {name} ({len(rows)} rows) "
            f"accuracy {accuracy:.1%}")


if __name__ == "__main__":
  main()
