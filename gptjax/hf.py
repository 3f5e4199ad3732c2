"""Hugging Face GPT-2 <-> gptjax: import a transformers GPT-2 directory (or hub name), export any gptjax model.

  python -m gptjax.hf import --hf=path/to/gpt2 --out=exports/gpt2      # a gptjax export (loader.load_model)
  python -m gptjax.hf export --workdir=runs/small --out=hf/small        # GPT2LMHeadModel.from_pretrained('hf/small')

`checkpoint.init_from='hf:path/to/gpt2'` (or `hf:gpt2` with network access) fine-tunes GPT-2 directly.
GPT-2's Conv1D stores W[in, out], as our kernels do, so weights are only reshaped: c_attn [D, 3D] is our
qkv_kernel [D, 3, N, H] (q, k, v, then heads), c_proj [D, D] our out_kernel [N, H, D]. The head is tied to wte
on both sides; our vocabulary is padded to a multiple of model.vocab_multiple with zero rows, which sampling
never draws (the tokenizer's vocab_size bounds it) and an export drops again.
"""

import io
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import flags, logging

from gptjax import checkpoint, cli, config as config_lib, paths
from gptjax.data import tokenizer as tokenizer_lib
from gptjax.errors import UserError
from gptjax.model import unstack_layers

# Both are GELU's tanh approximation (gptjax's MLP); HF names it either way.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# config.json fields whose other values change GPT-2's computation: (GPT-2's values, HF's default first).
_FIXED_FIELDS = {"activation_function": _TANH_GELU, "scale_attn_weights": (True,),
                 "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,),
                 "tie_word_embeddings": (True,)}
# Our parameter path -> HF tensor name (without the 'transformer.' prefix), outside the blocks and in block i
# (prefixed 'h.{i}.').
_TOP_NAMES = {("wte", "embedding"): "wte.weight", ("wpe", "embedding"): "wpe.weight",
              ("ln_f", "scale"): "ln_f.weight", ("ln_f", "bias"): "ln_f.bias"}
_BLOCK_NAMES = {("ln_1", "scale"): "ln_1.weight", ("ln_1", "bias"): "ln_1.bias",
                ("attn", "qkv_kernel"): "attn.c_attn.weight", ("attn", "qkv_bias"): "attn.c_attn.bias",
                ("attn", "out_kernel"): "attn.c_proj.weight", ("attn", "out_bias"): "attn.c_proj.bias",
                ("ln_2", "scale"): "ln_2.weight", ("ln_2", "bias"): "ln_2.bias",
                ("mlp", "fc", "kernel"): "mlp.c_fc.weight", ("mlp", "fc", "bias"): "mlp.c_fc.bias",
                ("mlp", "proj", "kernel"): "mlp.c_proj.weight", ("mlp", "proj", "bias"): "mlp.c_proj.bias"}
# HF tensors that are no parameters of ours: the causal-mask buffers of old checkpoints; the head, tied to wte.
_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias")
_HEAD = "lm_head.weight"
_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                       "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
_GPT2_FILES = ("vocab.json", "merges.txt")

# How a model name asks for a Hugging Face GPT-2 (gptjax.loader.load_model, checkpoint.init_from).
HF_PREFIX = "hf:"


class HFError(UserError, ValueError):
  """A Hugging Face directory or gptjax model that does not map onto GPT-2; the message names it and the fix."""


def _hf_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF shape of one of our per-layer parameters: heads (and q/k/v) flattened into GPT-2's D."""
  if leaf == "qkv_kernel":
    return (shape[0], int(np.prod(shape[1:])))
  if leaf == "qkv_bias":
    return (int(np.prod(shape)),)
  if leaf == "out_kernel":
    return (int(np.prod(shape[:2])), shape[2])
  return tuple(shape)


def read_hf_config(directory: str) -> dict:
  """config.json of a HF GPT-2 directory, checked to describe the computation gptjax's GPT-2 does."""
  path = os.path.join(directory, "config.json")
  if not paths.path(path).exists():
    raise HFError(f"{directory!r} has no config.json: pass a directory written by transformers' save_pretrained "
                  "(config.json + model.safetensors), or a hub name such as 'gpt2'.")
  hf = paths.read_json(path)
  if hf.get("model_type") != "gpt2":
    raise HFError(f"{path}: model_type={hf.get('model_type')!r} (architectures {hf.get('architectures')}); only "
                  "GPT-2 checkpoints (model_type 'gpt2', e.g. GPT2LMHeadModel) map onto gptjax's model.")
  for field, allowed in _FIXED_FIELDS.items():
    if hf.get(field, allowed[0]) not in allowed:
      raise HFError(f"{path}: {field}={hf[field]!r}, but gptjax's GPT-2 computes only {field} in {allowed}; "
                    "this model cannot be imported exactly.")
  if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
    raise HFError(f"{path}: n_inner={hf['n_inner']}, but gptjax's MLP is 4 * n_embd = {4 * hf['n_embd']} wide.")
  return hf


def gptjax_config(hf: dict, tokenizer_path: str = ""):
  """A gptjax config (default_config() otherwise) whose model is the HF config's GPT-2."""
  c = config_lib.default_config()
  m = c.model
  m.update(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], block_size=hf["n_positions"],
           vocab_size=-(-hf["vocab_size"] // m.vocab_multiple) * m.vocab_multiple, bias=True,
           ln_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=0.0)
  c.data.update(tokenizer="gpt2", tokenizer_path=tokenizer_path)
  return c


def _local_dir(path_or_name: str) -> str:
  """A local directory or a URL as is; otherwise a hub name, downloaded (weights in one format only) to HF's cache."""
  if paths.is_remote(path_or_name):
    return path_or_name
  if os.path.isdir(os.path.expanduser(path_or_name)):  # flags like --hf=~/gpt2 reach us unexpanded
    return os.path.expanduser(path_or_name)
  if os.path.exists(os.path.expanduser(path_or_name)) or path_or_name.startswith((".", "/", "~")):
    raise HFError(f"{path_or_name!r} is not a directory: pass the directory that holds config.json and "
                  "model.safetensors.")
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise HFError(f"{path_or_name!r} is no local directory, and downloading it from the Hugging Face Hub needs "
                  "huggingface_hub (pip install huggingface_hub); or pass a local GPT-2 directory.") from e
  patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", *_GPT2_FILES, "tokenizer.json"]
  try:
    directory = huggingface_hub.snapshot_download(path_or_name, allow_patterns=patterns)
    if not any(name.endswith(".safetensors") for name in os.listdir(directory)):
      directory = huggingface_hub.snapshot_download(path_or_name, allow_patterns=patterns + ["pytorch_model.bin"])
  except Exception as e:  # hub errors come in many types (offline, unknown repo, gated, ...)
    raise HFError(f"{path_or_name!r} is no local directory and cannot be downloaded from the Hugging Face Hub "
                  f"({type(e).__name__}: {e}); pass a local GPT-2 directory, or check the name and network "
                  "access.") from e
  return directory


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file, memory-mapped when local, else read whole (safetensors' own numpy API lacks
  bfloat16)."""
  try:
    with paths.path(path).open("rb") as f:
      header_len = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(header_len))
      header.pop("__metadata__", None)
      if paths.is_remote(path):
        data = np.frombuffer(f.read(), np.uint8)
      else:
        data = np.memmap(path, np.uint8, mode="r", offset=8 + header_len) if header else None
    tensors = {}
    for name, t in header.items():
      begin, end = t["data_offsets"]
      tensors[name] = data[begin:end].view(_SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])
    return tensors
  except (ValueError, KeyError, OSError) as e:
    raise HFError(f"{path} is not a readable safetensors file of float tensors ({type(e).__name__}: {e}); "
                  "download or save it again.") from e


def _write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes tensors as a .safetensors file that transformers loads (metadata format 'pt')."""
  names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, a in tensors.items():
    header[name] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the format recommends
  with paths.atomic_write(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob)
    for a in tensors.values():
      np.ascontiguousarray(a).tofile(f)


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise HFError(f"{path} is a PyTorch pickle: reading it needs torch (pip install torch), or save the model "
                  "as model.safetensors.") from e
  if paths.is_remote(path):  # no memory map over a network: read whole
    state = torch.load(io.BytesIO(paths.path(path).read_bytes()), map_location="cpu", weights_only=True)
  else:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  return {name: (t.float() if t.dtype == torch.bfloat16 else t).detach().numpy() for name, t in state.items()}


def read_hf_tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a HF model directory by name (without 'transformer.'): safetensors (sharded too) or .bin."""
  def path(name):
    return os.path.join(directory, name)
  if paths.path(path("model.safetensors")).exists():
    tensors = _read_safetensors(path("model.safetensors"))
  elif paths.path(path("model.safetensors.index.json")).exists():
    files = sorted(set(paths.read_json(path("model.safetensors.index.json"))["weight_map"].values()))
    tensors = {name: t for file in files for name, t in _read_safetensors(path(file)).items()}
  elif paths.path(path("pytorch_model.bin")).exists():
    tensors = _read_torch(path("pytorch_model.bin"))
  else:
    raise HFError(f"{directory!r} has no weights (model.safetensors, model.safetensors.index.json or "
                  "pytorch_model.bin): save the model with save_pretrained, or pass the directory that holds them.")
  return {name.removeprefix("transformer."): t for name, t in tensors.items()}


def _hf_tokenizer(directory: str) -> tokenizer_lib.GPT2Tokenizer:
  """GPT-2's byte-level BPE from vocab.json + merges.txt, or else from a transformers tokenizer.json."""
  if all(paths.path(os.path.join(directory, name)).exists() for name in _GPT2_FILES):
    return tokenizer_lib.GPT2Tokenizer.from_files(directory)
  path = os.path.join(directory, "tokenizer.json")
  if not paths.path(path).exists():
    raise HFError(f"{directory!r} has no tokenizer (vocab.json + merges.txt, or tokenizer.json): copy the model's "
                  "tokenizer files into it; gptjax reads and writes this model's text with them.")
  spec = paths.read_json(path)
  model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
  if (model.get("type"), pre.get("type"), pre.get("add_prefix_space", False)) != ("BPE", "ByteLevel", False):
    raise HFError(f"{path}: a {model.get('type')} model with pre-tokenizer {pre.get('type')} (add_prefix_space="
                  f"{pre.get('add_prefix_space')}) is not GPT-2's byte-level BPE; add GPT-2's vocab.json + "
                  "merges.txt to the directory.")
  vocab = dict(model["vocab"]) | {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return tokenizer_lib.GPT2Tokenizer.from_vocab(vocab, merges, path, path)


def _write_gpt2_files(directory: str, vocab: dict[str, int], merges: list[str]) -> None:
  with paths.atomic_write(os.path.join(directory, "vocab.json")) as f:
    json.dump(vocab, f, ensure_ascii=False)
  with paths.atomic_write(os.path.join(directory, "merges.txt")) as f:
    f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))


def _key(entry) -> str | int:
  return getattr(entry, "key", getattr(entry, "idx", None))


def import_hf(path_or_name: str, mesh=None) -> checkpoint.LoadedModel:
  """A HF GPT-2 (local directory or hub name) as a gptjax model, its parameters placed on `mesh` (step 0).

  Each parameter is assembled in host memory and only its shards are copied to their devices (the model's
  NamedShardings under config.mesh.rules): no device ever holds more than its part.
  """
  directory = _local_dir(path_or_name)
  hf = read_hf_config(directory)
  tokenizer = _hf_tokenizer(directory)
  if tokenizer.vocab_size > hf["vocab_size"]:
    raise HFError(f"{directory!r}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                  f"{hf['vocab_size']}: the tokenizer files belong to another model.")
  config = gptjax_config(hf, paths.absolute(directory))
  model_cfg, graphdef, target = checkpoint.inference_target(config, config.model.vocab_size, mesh)
  tensors = read_hf_tensors(directory)
  used = set()

  def take(name, leaf, shape, dtype):
    """HF tensor `name` as our array of `shape`, after checking it has GPT-2's shape for this config."""
    want = (hf["vocab_size"], shape[1]) if name == "wte.weight" else _hf_shape(leaf, shape)
    if name not in tensors:
      raise HFError(f"{directory!r}: the weights lack {name!r}, which config.json's {hf['n_layer']}-layer GPT-2 "
                    "has; the weights and config.json do not belong together.")
    if tensors[name].shape != want:
      raise HFError(f"{directory!r}: {name} has shape {tensors[name].shape}, but config.json (n_layer="
                    f"{hf['n_layer']}, n_head={hf['n_head']}, n_embd={hf['n_embd']}, n_positions="
                    f"{hf['n_positions']}, vocab_size={hf['vocab_size']}) needs {want}; the weights and "
                    "config.json do not belong together.")
    used.add(name)
    # A copy, never a view of the memory-mapped file: a CPU device may alias host memory, and the file may be
    # overwritten later (an export into the same directory).
    a = np.array(tensors[name], dtype)
    if name == "wte.weight":  # padding rows: zero, never drawn
      a = np.pad(a, ((0, shape[0] - a.shape[0]), (0, 0)))
    return a.reshape(shape)

  def place(path, var):
    keys = tuple(_key(k) for k in path)
    if keys[0] != "blocks":
      a = take(_TOP_NAMES[keys], keys[-1], var.shape, var.dtype)
    elif model_cfg.scan_layers:
      a = np.stack([take(f"h.{i}.{_BLOCK_NAMES[keys[1:]]}", keys[-1], var.shape[1:], var.dtype)
                    for i in range(model_cfg.n_layer)])
    else:
      a = take(f"h.{keys[1]}.{_BLOCK_NAMES[keys[2:]]}", keys[-1], var.shape, var.dtype)
    return jax.make_array_from_callback(a.shape, var.sharding, lambda index: a[index])

  params = jax.tree_util.tree_map_with_path(place, target)
  head = tensors.get(_HEAD)
  if head is not None and not np.array_equal(head, tensors["wte.weight"]):
    raise HFError(f"{directory!r}: lm_head.weight differs from wte.weight, but gptjax ties the head to the "
                  "embedding; this untied model cannot be imported exactly.")
  unknown = sorted(n for n in tensors if n not in used and n != _HEAD and not _BUFFER.fullmatch(n))
  if unknown:
    raise HFError(f"{directory!r} holds tensors that GPT2LMHeadModel does not have: {unknown[:5]}; is it another "
                  "GPT-2 variant (e.g. with a classification head)? Only the language model can be imported.")
  return checkpoint.LoadedModel(config, model_cfg, graphdef, params, tokenizer, step=0)


def export_hf(path: str, out_dir: str, dtype: str = "float32", step: int | None = None) -> str:
  """Writes a gptjax model (workdir, export or 'hf:...') as a HF GPT-2 directory; returns out_dir.

  The vocabulary is cut back to the tokenizer's. GPT-2 BPE tokenizers are written too (vocab.json, merges.txt,
  tokenizer_config.json); other tokenizers have no transformers equivalent, so none is written.
  """
  loaded = import_hf(path[len(HF_PREFIX):]) if path.startswith(HF_PREFIX) else checkpoint.load_saved(path, step=step)
  cfg, tokenizer = loaded.model_cfg, loaded.tokenizer
  if not cfg.bias:
    raise HFError(f"{path}: model.bias=False, but Hugging Face's GPT-2 has a bias in every linear layer and "
                  "LayerNorm; only models trained with model.bias=True export to GPT2LMHeadModel.")
  _, params = unstack_layers(loaded.graphdef, jax.device_get(loaded.params))
  np_dtype = jnp.dtype(dtype)

  def get(tree, keys):
    for k in keys:
      tree = tree[k]
    a = np.asarray(tree)
    return a.reshape(_hf_shape(keys[-1], a.shape)).astype(np_dtype)

  tensors = {f"transformer.{name}": get(params, keys) for keys, name in _TOP_NAMES.items()}
  tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:tokenizer.vocab_size]
  for i in range(cfg.n_layer):
    tensors |= {f"transformer.h.{i}.{name}": get(params["blocks"][i], keys) for keys, name in _BLOCK_NAMES.items()}
  paths.makedirs(out_dir)
  _write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
  hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": tokenizer.vocab_size,
        "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.ln_eps,
        # gptjax has no dropout on attention probabilities.
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
        "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "tie_word_embeddings": True,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "dtype": dtype}
  paths.write_json(os.path.join(out_dir, "config.json"), hf, indent=2)
  if tokenizer.kind == "gpt2":
    spec = json.loads(tokenizer.payload)
    _write_gpt2_files(out_dir, spec["vocab"], spec["merges"])
    eos = next(token for token, i in spec["vocab"].items() if i == tokenizer.eos_id)
    paths.write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.block_size, "bos_token": eos, "eos_token": eos,
        "unk_token": eos, "add_prefix_space": False}, indent=2)
  else:
    logging.warning("%s has a %s tokenizer, which transformers' GPT-2 cannot read: %s holds no tokenizer files; "
                    "encode text with gptjax's (gptjax.data.load_tokenizer of the run's tokenizer).", path,
                    tokenizer.kind, out_dir)
  return out_dir


def main(argv):
  """`import` or `export`, as in the module docstring."""
  cli.quiet_libraries()
  f = flags.FLAGS
  command = argv[1] if len(argv) == 2 else None
  if command == "import" and f.hf:
    loaded = import_hf(f.hf)
    out = checkpoint.write_export(f.out, loaded.params, loaded.config, loaded.tokenizer, 0, f.dtype, HF_PREFIX + f.hf)
    print(f"imported {f.hf} -> {out} ({f.dtype}); load it with loader.load_model or checkpoint.init_from")
  elif command == "export" and f.workdir:
    out = export_hf(f.workdir, f.out, f.dtype, f.step)
    print(f"exported {f.workdir} -> {out}; transformers.GPT2LMHeadModel.from_pretrained({out!r}) loads it")
  else:
    sys.exit("usage: python -m gptjax.hf import --hf=<HF dir or hub name> --out=<dir>\n"
             "       python -m gptjax.hf export --workdir=<run or export> --out=<dir>\n"
             f"(got {' '.join(argv[1:]) or 'no command'})")


if __name__ == "__main__":
  # Defined only when run as a command: tests import this module next to others that define --workdir/--out.
  flags.DEFINE_string("hf", None, "import: a HF GPT-2 directory (config.json + model.safetensors) or hub name.")
  flags.DEFINE_string("workdir", None, "export: a run directory (latest checkpoint) or a gptjax export.")
  flags.DEFINE_string("out", None, "Directory to write to.", required=True)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter dtype written.")
  flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest readable one).")
  cli.run(main)
