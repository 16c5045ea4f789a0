"""Hugging Face BERT checkpoints (safetensors) as parameters of our Flax BERT towers.

Reads `model.safetensors` (or the shards listed in `model.safetensors.index.json`) with
`safetensors.numpy`, so no torch is needed, and renames PyTorch BERT tensors
(`encoder.layer.0.attention.self.query.weight`, `[out, in]`) to our HF-Flax layout
(`encoder/layer/0/attention/self/query/kernel`, `[in, out]`). `apply_to_realm_params` then puts
them into the BERT towers of a `RealmModel` parameter tree, e.g. to start from all-MiniLM-L6-v2
or bert-base-uncased instead of a random initialization.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np
from etils import epath
from safetensors import numpy as safetensors_numpy

from realm_jax.models import bert

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
WEIGHTS_INDEX_FILENAME = "model.safetensors.index.json"
REALM_TOWERS = ("embedder", "query_embedder", "doc_embedder", "encoder")

# Checkpoint tensors our model has no place for, skipped silently: the pooler (our BertModel
# has none), the next-sentence head, and the index buffers HF saves with the embeddings.
_IGNORED = re.compile(
    r"^(pooler\.|cls\.seq_relationship\.|.*\.position_ids$|.*\.token_type_ids$)")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")
_EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")
_LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "intermediate.dense", "output.dense")
_LAYER_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
_MLM_PREFIX = "cls.predictions."
_POSITION_TABLE = ("embeddings", "position_embeddings", "embedding")

Params = dict[str, Any]


def _model_dir(model_dir_or_file: epath.PathLike) -> epath.Path:
  path = epath.Path(model_dir_or_file)
  return path if path.is_dir() else path.parent


def read_hf_config(model_dir: epath.PathLike) -> dict[str, Any]:
  """The fields of `config.json` in an HF model directory (or next to a weights file)."""
  path = _model_dir(model_dir) / CONFIG_FILENAME
  if not path.is_file():
    raise FileNotFoundError(f"No {CONFIG_FILENAME} in {os.fspath(path.parent)}.")
  return json.loads(path.read_text())


def bert_config_from_hf(model_dir: epath.PathLike, **overrides: Any) -> bert.BertConfig:
  """Our BertConfig for an HF BERT checkpoint; `overrides` set e.g. dtype or dropout_rate.

  Refuses configs our BERT would compute differently (another activation, relative positions).
  """
  hf = read_hf_config(model_dir)
  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"hidden_act={act!r}: our BERT implements exact 'gelu' only.")
  positions = hf.get("position_embedding_type", "absolute")
  if positions != "absolute":
    raise ValueError(f"position_embedding_type={positions!r}: only 'absolute' is supported.")
  kwargs = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf.get("max_position_embeddings", 512),
      type_vocab_size=hf.get("type_vocab_size", 2),
      dropout_rate=hf.get("hidden_dropout_prob", 0.1),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      initializer_range=hf.get("initializer_range", 0.02))
  kwargs.update(overrides)
  return bert.BertConfig(**kwargs)


def _weight_files(model_dir_or_file: epath.PathLike) -> list[epath.Path]:
  """The .safetensors file(s) of a checkpoint: one file, or the shards named by the index."""
  path = epath.Path(model_dir_or_file)
  if path.is_file():
    if path.name.endswith(".index.json"):
      path = path.parent
    else:
      return [path]
  if not path.is_dir():
    raise FileNotFoundError(f"No such checkpoint file or directory: {os.fspath(path)}")
  if (path / WEIGHTS_FILENAME).is_file():
    return [path / WEIGHTS_FILENAME]
  if (path / WEIGHTS_INDEX_FILENAME).is_file():
    weight_map = json.loads((path / WEIGHTS_INDEX_FILENAME).read_text())["weight_map"]
    return [path / name for name in sorted(set(weight_map.values()))]
  raise FileNotFoundError(
      f"Neither {WEIGHTS_FILENAME} nor {WEIGHTS_INDEX_FILENAME} in {os.fspath(path)} "
      "(PyTorch .bin checkpoints are not supported; convert them to safetensors).")


def _read_tensors(files: Iterable[epath.Path]) -> dict[str, np.ndarray]:
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    for name, value in safetensors_numpy.load_file(os.fspath(file)).items():
      if name in tensors:
        raise ValueError(f"Tensor {name!r} appears in more than one shard ({os.fspath(file)}).")
      tensors[name] = value
  return tensors


def _canonical_name(name: str) -> str:
  """Strips the `bert.` prefix of *ForPreTraining checkpoints; legacy gamma/beta -> weight/bias."""
  name = name.removeprefix("bert.")
  if ".LayerNorm." in name:
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
  return name


def _listing(names: list[str], limit: int = 12) -> str:
  """Names for an error message, at most `limit` of them."""
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _linear(hf: str, path: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], bool]]:
  return {f"{hf}.weight": (path + ("kernel",), True), f"{hf}.bias": (path + ("bias",), False)}


def _layer_norm(hf: str, path: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], bool]]:
  return {f"{hf}.weight": (path + ("scale",), False), f"{hf}.bias": (path + ("bias",), False)}


def _expected_names(num_layers: int, with_mlm_head: bool
                    ) -> dict[str, tuple[tuple[str, ...], bool]]:
  """Canonical HF tensor name -> (our parameter path, transpose [out, in] -> [in, out]?)."""
  names = {f"embeddings.{table}.weight": (("embeddings", table, "embedding"), False)
           for table in _EMBEDDING_TABLES}
  names.update(_layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm")))
  for i in range(num_layers):
    for module in _LAYER_LINEARS:
      names.update(_linear(f"encoder.layer.{i}.{module}",
                           ("encoder", "layer", str(i), *module.split("."))))
    for module in _LAYER_NORMS:
      names.update(_layer_norm(f"encoder.layer.{i}.{module}",
                               ("encoder", "layer", str(i), *module.split("."))))
  if with_mlm_head:
    head = ("cls", "predictions")
    names["cls.predictions.bias"] = (head + ("bias",), False)
    names.update(_linear("cls.predictions.transform.dense", head + ("transform", "dense")))
    names.update(_layer_norm("cls.predictions.transform.LayerNorm",
                             head + ("transform", "LayerNorm")))
  return names


def _take_mlm_decoder(tensors: dict[str, np.ndarray]) -> None:
  """Folds HF's tied MLM decoder into our layout (our decoder is the word-embedding table).

  The decoder bias is the same parameter as `cls.predictions.bias` in HF; an untied decoder
  weight cannot be represented and is an error.
  """
  weight = tensors.pop("cls.predictions.decoder.weight", None)
  if weight is not None:
    words = tensors.get("embeddings.word_embeddings.weight")
    if words is None or not np.array_equal(weight, words):
      raise ValueError("cls.predictions.decoder.weight differs from the word embeddings: "
                       "our MLM head ties them, so an untied decoder cannot be loaded.")
  bias = tensors.pop("cls.predictions.decoder.bias", None)
  if bias is not None:
    other = tensors.setdefault("cls.predictions.bias", bias)
    if not np.array_equal(other, bias):
      raise ValueError("cls.predictions.decoder.bias differs from cls.predictions.bias.")


def load_hf_bert_params(model_dir_or_file: epath.PathLike) -> Params:
  """Reads an HF BERT safetensors checkpoint into our BertModel's parameter layout (numpy).

  Returns `{"embeddings": ..., "encoder": ...}` (float32), plus `{"cls": {"predictions": ...}}`
  when the checkpoint has an MLM head; pass the tree without "cls" to `BertModel.apply`. The
  pooler, the next-sentence head and position-id buffers are skipped; any other unknown
  tensor, and any missing one, is a ValueError naming them. When a config.json lies beside the
  weights, its layer count must match theirs.
  """
  files = _weight_files(model_dir_or_file)
  tensors: dict[str, np.ndarray] = {}
  for name, value in _read_tensors(files).items():
    canonical = _canonical_name(name)
    if canonical in tensors:
      raise ValueError(f"Tensor {name!r} duplicates {canonical!r} after renaming.")
    tensors[canonical] = value
  tensors = {name: value for name, value in tensors.items() if not _IGNORED.match(name)}
  _take_mlm_decoder(tensors)
  layer_ids = {int(m.group(1)) for m in map(_LAYER.match, tensors) if m}
  num_layers = max(layer_ids, default=-1) + 1
  config_file = files[0].parent / CONFIG_FILENAME
  if config_file.is_file():
    configured = json.loads(config_file.read_text()).get("num_hidden_layers", num_layers)
    if configured != num_layers:
      raise ValueError(f"{os.fspath(config_file)} says num_hidden_layers={configured} but the "
                       f"weights have {num_layers} layers.")
  expected = _expected_names(num_layers, any(n.startswith(_MLM_PREFIX) for n in tensors))
  unexpected = sorted(set(tensors) - set(expected))
  missing = sorted(set(expected) - set(tensors))
  source = ", ".join(os.fspath(f) for f in files)
  if unexpected:
    raise ValueError(f"{source}: tensors with no place in our BERT: {_listing(unexpected)}")
  if missing:
    raise ValueError(f"{source}: missing BERT tensors: {_listing(missing)}")
  flat = {}
  for name, (path, transpose) in expected.items():
    value = tensors[name].astype(np.float32)  # also fp16 / bf16 checkpoints
    flat[path] = np.ascontiguousarray(value.T) if transpose else value
  return flax.traverse_util.unflatten_dict(flat)


def _fit(path: str, value: np.ndarray, target: Any) -> np.ndarray:
  """The checkpoint value shaped for the model's leaf, or a ValueError naming the path.

  The position table may be longer than the model's (HF BERTs have 512 positions; we often
  build shorter models): its first rows are kept, as positions count from 0. A shorter
  checkpoint table, or any other shape difference, is an error.
  """
  shape = tuple(target.shape)
  if (path.endswith("/".join(_POSITION_TABLE)) and value.shape[1:] == shape[1:]
      and value.shape[0] >= shape[0]):
    value = value[:shape[0]]
  if value.shape != shape:
    raise ValueError(f"{path}: the checkpoint has shape {value.shape}, the model {shape} "
                     "(different hidden size, vocabulary, layer or position count?)")
  return value


def apply_to_realm_params(params: Mapping[str, Any], bert_params: Mapping[str, Any],
                          towers: Iterable[str] = REALM_TOWERS) -> Params:
  """A copy of RealmModel params with each present tower's BERT set from `bert_params`.

  `bert_params` comes from `load_hf_bert_params`. Every BERT leaf of a tower is replaced (a
  leaf missing on either side, or a shape difference, is a ValueError naming its path); the
  position table is cut to the model's length (see `_fit`). The checkpoint's MLM head, if it
  has one, also goes to `encoder/cls/predictions`. Heads the checkpoint lacks (the embedder's
  projection and LayerNorm, a missing MLM head) keep their values.
  """
  towers = tuple(towers)
  frozen = isinstance(params, flax.core.FrozenDict)
  flat = flax.traverse_util.flatten_dict(params if frozen else dict(params), sep="/")
  source = flax.traverse_util.flatten_dict(dict(bert_params), sep="/")
  bert_source = {k: v for k, v in source.items() if not k.startswith("cls/")}
  head_source = {k: v for k, v in source.items() if k.startswith("cls/")}
  present = [tower for tower in towers if any(k.startswith(f"{tower}/") for k in flat)]
  if not present:
    raise ValueError(f"None of the towers {towers} is in the parameters; they have "
                     f"{sorted({k.split('/')[0] for k in flat})}.")
  for tower in present:
    replacements = {f"{tower}/bert/{k}": v for k, v in bert_source.items()}
    if tower == "encoder":
      replacements.update({f"{tower}/{k}": v for k, v in head_source.items()})
    model_bert = {k for k in flat if k.startswith(f"{tower}/bert/")}
    extra = sorted(set(replacements) - set(flat))
    uncovered = sorted(model_bert - set(replacements))
    if extra:
      raise ValueError(f"Checkpoint parameters with no place in the model: {_listing(extra)}")
    if uncovered:
      raise ValueError(f"Model parameters the checkpoint does not have: {_listing(uncovered)}")
    for path, value in replacements.items():
      target = flat[path]
      flat[path] = jnp.asarray(_fit(path, np.asarray(value), target), dtype=target.dtype)
  out = flax.traverse_util.unflatten_dict(flat, sep="/")
  return flax.core.freeze(out) if frozen else out
