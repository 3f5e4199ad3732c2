"""Writes the unlabelled pretraining text for the fine-tuning measurements (benchmarks/RESULTS.md).

  python -m benchmarks.task_corpus --data=../shared/data --out=runs/task_corpus

Only training splits are used, and only their text (no labels): CoNLL-2003 train sentences (words joined by
spaces, one sentence a line), SST-2 train phrases (deduplicated), and tinyshakespeare. Dev sets stay unseen.
"""

import argparse
import os
import shutil


def conll_sentences(path: str):
  words = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.split()
      if parts and parts[0] != "-DOCSTART-":
        words.append(parts[0])
      elif words:
        yield " ".join(words)
        words = []
  if words:
    yield " ".join(words)


def sst2_phrases(path: str):
  seen = set()
  with open(path, encoding="utf-8") as f:
    next(f)  # header
    for line in f:
      text = line.split("\t")[0].strip()
      if text and text not in seen:
        seen.add(text)
        yield text


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default="../shared/data")
  parser.add_argument("--out", default="runs/task_corpus")
  parser.add_argument("--sst2", default="", help="SST-2 directory (default <data>/sst2), e.g. the training side of "
                      "benchmarks/sst2_honest_split.py, so that no held-out sentence is pretrained on")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  sources = {"conll2003_train.txt": conll_sentences(os.path.join(args.data, "conll2003", "train.txt")),
             "sst2_train.txt": sst2_phrases(os.path.join(args.sst2 or os.path.join(args.data, "sst2"), "train.tsv"))}
  for name, lines in sources.items():
    with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
      f.writelines(line + "\n" for line in lines)
  shutil.copy(os.path.join(args.data, "tinyshakespeare.txt"), os.path.join(args.out, "tinyshakespeare.txt"))
  for name in sorted(os.listdir(args.out)):
    print(f"{name}: {os.path.getsize(os.path.join(args.out, name)) / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
