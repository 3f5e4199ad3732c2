"""Instruction / causal supervised fine-tuning: prompt-response or chat JSONL, loss on the responses only.

A row is {"prompt": ..., "response": ...} or {"messages": [{"role": "system"|"user"|"assistant", "content": ...},
...]}. Turns are rendered as

  ### User:
  <content>

  ### Assistant:
  <content><EOS>

and only the assistant contents and their EOS (so the model learns to stop) are trained and scored.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import losses, paths
from gptjax.errors import UserError
from gptjax.finetune import hub

ROLES = ("system", "user", "assistant")


class SftDataError(UserError, ValueError):
  """Bad instruction data; the message names file:line and the fix."""


@dataclasses.dataclass(frozen=True)
class Conversation:
  """(role, content) turns, the last one the assistant's, and where the row is ('file:line')."""
  turns: tuple[tuple[str, str], ...]
  where: str


def header(role: str) -> str:
  return f"### {role.capitalize()}:\n"


def prompt_text(turns) -> str:
  """The rendered text of `turns` followed by the assistant header: what a model continues with a response."""
  return "".join(header(role) + content + ("" if role == "assistant" else "\n\n") for role, content in turns) + \
      header("assistant")


def read_conversations(path: str, prompt_field: str = "prompt", response_field: str = "response",
                       messages_field: str = "messages") -> list[Conversation]:
  """The conversations of a JSONL file or an 'hf:' dataset; a malformed row is an error naming where it is."""
  conversations = []
  for where, row in hub.rows(path) if hub.is_hf(path) else _json_rows(path):
    if row.get(messages_field) is not None:  # a dataset's rows have every column: None where a row has no chat
      messages = row[messages_field]
      if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise SftDataError(f"{where}: {messages_field!r} must be a list of {{'role', 'content'}} objects.")
      turns = tuple((m.get("role"), m.get("content")) for m in messages)
    elif prompt_field in row and response_field in row:
      turns = (("user", row[prompt_field]), ("assistant", row[response_field]))
    else:
      raise SftDataError(f"{where}: needs {prompt_field!r} and {response_field!r}, or {messages_field!r}; found "
                         f"{sorted(row)}. Set task.prompt_field/response_field/messages_field.")
    for role, content in turns:
      if role not in ROLES:
        raise SftDataError(f"{where}: role {role!r} is not one of {ROLES}.")
      if not isinstance(content, str) or not content.strip():
        raise SftDataError(f"{where}: a {role} turn has empty (or non-string) content; give it text.")
    if not turns or turns[-1][0] != "assistant":
      raise SftDataError(f"{where}: the last turn must be the assistant's (the response to learn).")
    conversations.append(Conversation(turns, where))
  if not conversations:
    raise SftDataError(f"{path}: holds no conversations.")
  return conversations


def _json_rows(path: str):
  """('file:line', object) of each non-blank line of a JSONL file."""
  with paths.open_text(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise SftDataError(f"{where}: not valid JSON ({e}); each line must be one object.") from e
      if not isinstance(row, dict):
        raise SftDataError(f"{where}: a JSON {type(row).__name__}, not an object.")
      yield where, row


def encode(tokenizer, conversations: list[Conversation], max_len: int) -> dict:
  """'tokens' [N, max_len] (right-padded with EOS), 'targets' [N, max_len] (1 where the token is trained: an
  assistant content token or the EOS ending it), 'lengths' [N]. Rows longer than max_len are cut; one whose
  cut leaves no trained token is an error naming file:line.
  """
  arrays = {"tokens": np.full((len(conversations), max_len), tokenizer.eos_id, np.int32),
            "targets": np.zeros((len(conversations), max_len), np.int32),
            "lengths": np.zeros(len(conversations), np.int32)}
  for n, c in enumerate(conversations):
    pieces, trained = [], []
    for role, content in c.turns:
      assistant = role == "assistant"
      pieces += [tokenizer.encode(header(role)), tokenizer.encode(content),
                 np.array([tokenizer.eos_id]) if assistant else tokenizer.encode("\n\n")]
      trained += [False, assistant, assistant]
    ids = np.concatenate(pieces)[:max_len]
    mask = np.concatenate([np.full(len(p), t) for p, t in zip(pieces, trained)])[:max_len]
    if not mask[1:].any():
      raise SftDataError(f"{c.where}: no response token fits in task.max_len={max_len} tokens (the prompt is "
                         "longer); raise task.max_len (up to the model's block_size) or shorten the prompt.")
    arrays["tokens"][n, :len(ids)] = ids
    arrays["targets"][n, :len(ids)] = mask
    arrays["lengths"][n] = len(ids)
  return arrays


def loss(model, head: dict, batch: dict, dropout_key: jax.Array | None, z_loss: float = 0.0
         ) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy over response tokens (+ train.z_loss's term), per row [nats, tokens, correct next-token
  guesses] [B, 3]).

  `head` is empty: the LM head is the model's own (tied to the token embedding).
  """
  del head
  tokens_BT = batch["tokens"]
  h_BTD = model(tokens_BT[:, :-1], dropout_key)
  scored_BT = batch["targets"][:, 1:].astype(jnp.float32)
  nats_BT, lse_BT = losses.token_terms(h_BTD, model.head_embedding(), tokens_BT[:, 1:])
  nats_BT = nats_BT * scored_BT
  correct_BT = (model.logits(h_BTD).argmax(-1) == tokens_BT[:, 1:]) * scored_BT
  objective_BT = nats_BT + z_loss * jnp.square(lse_BT) * scored_BT if z_loss else nats_BT
  return objective_BT.sum() / jnp.maximum(scored_BT.sum(), 1), jnp.stack(
      [nats_BT.sum(1), scored_BT.sum(1), correct_BT.sum(1)], axis=-1)


def metrics(per_row_N3: np.ndarray) -> dict:
  """Response loss (nats/token), perplexity and next-token accuracy over all scored tokens."""
  nats, tokens, correct = per_row_N3.astype(np.float64).sum(0)
  mean = nats / max(tokens, 1)
  return {"loss": mean, "perplexity": float(np.exp(mean)), "token_accuracy": correct / max(tokens, 1),
          "tokens": int(tokens)}
