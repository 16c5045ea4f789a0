"""Hugging Face BERT and REALM checkpoints as parameters of our Flax towers.

Reads `model.safetensors` (or its shards) with safetensors' numpy backend and
`pytorch_model.bin` (or its shards) with a restricted unpickler of torch's zip format, so no
torch is needed either way. Tensors are read lazily: a RealmForOpenQA checkpoint's 13M x 128
`block_emb` buffer is never loaded.

Checkpoint layouts understood (`checkpoint_kind`), by their tensor names:

  kind            HF class                      towers it fills (our names)
  bert            BertModel / BertFor*           every BERT of the model (prefix "" or `bert.`)
  realm_embedder  RealmEmbedder                 embedder   (`realm.*`, `cls.dense`, `cls.LayerNorm`)
  realm_scorer    RealmScorer                   embedder   (`embedder.realm.*`, `embedder.cls.*`)
  realm_encoder   RealmKnowledgeAugEncoder      encoder    (`realm.*`, `cls.predictions.*`)
  realm_reader    RealmReader                   reader     (`realm.*`, `qa_outputs.*`)
  realm_openqa    RealmForOpenQA                embedder + reader (`embedder.*`, `reader.*`)

Our names (see bert.py, embedder.py, realm.py, reader.py), from PyTorch `[out, in]` weights to
Flax `[in, out]` kernels:

  HF                                  ours
  realm.embeddings/encoder.*          <tower>/bert/embeddings, <tower>/bert/encoder
  realm.pooler.dense                  embedder/bert/pooler/dense (the MLM encoder and the reader
                                      never use a pooler: skipped for them)
  cls.dense, cls.LayerNorm (embedder) embedder/projection, embedder/LayerNorm
  cls.predictions.* (encoder)         encoder/cls/predictions (decoder tied to word embeddings)
  qa_outputs.*                        reader/qa_outputs/{dense_intermediate,layer_normalization,
                                      dense_output}

Skipped, because the HF forward pass never reads them: `position_ids` / `token_type_ids`
buffers, the next-sentence head, `cls.predictions.*` of RealmEmbedder (an untied, unused MLM
head: the source of the old "decoder.weight differs" error) and of RealmReader, and the
OpenQA `block_emb` buffer (the index: build ours with the loaded embedder instead).

The checkpoint's `config.json` decides numerics our modules must match: `hidden_act` (HF
"gelu" is exact, "gelu_new" the tanh form that HF REALM defaults to), `layer_norm_eps` and the
sizes. `hf_config_mismatches` lists every field where a model config disagrees, so a run never
loads weights into a model that computes something else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np
from etils import epath
from safetensors import safe_open

from realm_jax.models import bert

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
WEIGHTS_INDEX_FILENAME = "model.safetensors.index.json"
TORCH_WEIGHTS_FILENAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_FILENAME = "pytorch_model.bin.index.json"
REALM_TOWERS = ("embedder", "query_embedder", "doc_embedder", "encoder", "reader")
EMBEDDER_TOWERS = ("embedder", "query_embedder", "doc_embedder")

# Tensors no forward pass of ours (or HF's) reads, skipped in every BERT body.
_IGNORED = re.compile(r"^(cls\.seq_relationship\.|.*\.position_ids$|.*\.token_type_ids$)")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")
_EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")
_LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "intermediate.dense", "output.dense")
_LAYER_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
_MLM_PREFIX = "cls.predictions."
_POSITION_TABLE = ("embeddings", "position_embeddings", "embedding")

Params = dict[str, Any]
Loader = Callable[[], np.ndarray]


# ---- config.json ----------------------------------------------------------------------------


def _model_dir(model_dir_or_file: epath.PathLike) -> epath.Path:
  path = epath.Path(model_dir_or_file)
  return path if path.is_dir() else path.parent


def read_hf_config(model_dir: epath.PathLike) -> dict[str, Any]:
  """The fields of `config.json` in an HF model directory (or next to a weights file)."""
  path = _model_dir(model_dir) / CONFIG_FILENAME
  if not path.is_file():
    raise FileNotFoundError(f"No {CONFIG_FILENAME} in {os.fspath(path.parent)}.")
  return json.loads(path.read_text())


def _hf_defaults(hf: Mapping[str, Any]) -> dict[str, Any]:
  """HF's class defaults for fields a config.json may omit (BertConfig vs RealmConfig)."""
  if hf.get("model_type") == "realm":
    return dict(hidden_act="gelu_new", layer_norm_eps=1e-12, reader_layer_norm_eps=1e-3,
                retriever_proj_size=128, span_hidden_size=256, max_span_width=10,
                type_vocab_size=2, max_position_embeddings=512,
                attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)
  return dict(hidden_act="gelu", layer_norm_eps=1e-12, type_vocab_size=2,
              max_position_embeddings=512, attention_probs_dropout_prob=0.1,
              hidden_dropout_prob=0.1)


def _hf_get(hf: Mapping[str, Any], key: str) -> Any:
  return hf[key] if key in hf else _hf_defaults(hf).get(key)


def bert_config_from_hf(model_dir: epath.PathLike, **overrides: Any) -> bert.BertConfig:
  """Our BertConfig for an HF BERT or REALM checkpoint; `overrides` set e.g. dtype or dropout.

  Activation, LayerNorm epsilon, dropout rates and sizes come from config.json. Refuses
  configs our BERT would compute differently (an unknown activation, relative positions).
  """
  hf = read_hf_config(model_dir)
  act = _hf_get(hf, "hidden_act")
  if act not in bert.ACTIVATIONS:
    raise ValueError(f"hidden_act={act!r}: our BERT implements {sorted(bert.ACTIVATIONS)}.")
  positions = hf.get("position_embedding_type", "absolute")
  if positions != "absolute":
    raise ValueError(f"position_embedding_type={positions!r}: only 'absolute' is supported.")
  kwargs = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=_hf_get(hf, "max_position_embeddings"),
      type_vocab_size=_hf_get(hf, "type_vocab_size"),
      dropout_rate=_hf_get(hf, "hidden_dropout_prob"),
      attention_dropout_rate=_hf_get(hf, "attention_probs_dropout_prob"),
      layer_norm_eps=_hf_get(hf, "layer_norm_eps"), hidden_act=act,
      initializer_range=hf.get("initializer_range", 0.02))
  kwargs.update(overrides)
  return bert.BertConfig(**kwargs)


# (HF config.json key, our config.model key, our default when the model config lacks it)
_SAME_FIELDS = (
    ("hidden_size", "hidden_size", None),
    ("num_hidden_layers", "num_layers", None),
    ("num_attention_heads", "num_heads", None),
    ("intermediate_size", "intermediate_size", None),
    ("hidden_act", "hidden_act", "gelu"),
    ("layer_norm_eps", "layer_norm_eps", 1e-12),
    ("type_vocab_size", "type_vocab_size", 2),
)


def _model_get(model_config: Any, key: str, default: Any = None) -> Any:
  if isinstance(model_config, Mapping) or hasattr(model_config, "get"):
    return model_config.get(key, default)
  return getattr(model_config, key, default)


def hf_config_mismatches(hf_config: Mapping[str, Any], model_config: Any,
                         vocab_size: int | None = None) -> list[str]:
  """Every field where our model config would compute differently from the checkpoint.

  `model_config` is `config.model` (ml_collections) or a `bert.BertConfig`; fields it lacks
  take today's defaults (exact gelu, eps 1e-12). Compared: sizes, `hidden_act` (gelu vs
  gelu_new are different functions), `layer_norm_eps` (relative 1e-6), the type vocabulary,
  `max_position_embeddings` (the checkpoint needs at least the model's; its first rows are
  used), absolute positions, the retriever's `embed_dim` for REALM checkpoints, and
  `vocab_size` when given (it is not part of config.model). One line per mismatch, naming our
  field and the checkpoint's; empty when they agree.
  """
  problems = []
  for hf_key, our_key, default in _SAME_FIELDS:
    theirs = _hf_get(hf_config, hf_key)
    ours = _model_get(model_config, our_key, default)
    if theirs is None or ours is None:
      continue
    if isinstance(theirs, float) or isinstance(ours, float):
      same = math.isclose(float(theirs), float(ours), rel_tol=1e-6)
    elif hf_key == "hidden_act":
      same = bert.ACTIVATIONS.get(theirs, theirs) == bert.ACTIVATIONS.get(ours, ours)
    else:
      same = theirs == ours
    if not same:
      problems.append(f"model.{our_key}={ours!r} but the checkpoint's config.json has "
                      f"{hf_key}={theirs!r}")
  theirs = _hf_get(hf_config, "max_position_embeddings")
  ours = _model_get(model_config, "max_position_embeddings")
  if theirs is not None and ours is not None and ours > theirs:
    problems.append(f"model.max_position_embeddings={ours} exceeds the checkpoint's "
                    f"max_position_embeddings={theirs}")
  positions = hf_config.get("position_embedding_type", "absolute")
  if positions != "absolute":
    problems.append(f"the checkpoint's position_embedding_type={positions!r}; our BERT has "
                    "absolute positions only")
  if hf_config.get("model_type") == "realm":
    ours = _model_get(model_config, "embed_dim")
    theirs = _hf_get(hf_config, "retriever_proj_size")
    if ours is not None and ours != theirs:
      problems.append(f"model.embed_dim={ours} but the checkpoint's config.json has "
                      f"retriever_proj_size={theirs}")
  if vocab_size is not None and "vocab_size" in hf_config and hf_config["vocab_size"] != \
      vocab_size:
    problems.append(f"the vocabulary has {vocab_size} tokens but the checkpoint's config.json "
                    f"has vocab_size={hf_config['vocab_size']}")
  return problems


def check_hf_config(model_dir: epath.PathLike, model_config: Any,
                    vocab_size: int | None = None) -> None:
  """Raises a ValueError listing every `hf_config_mismatches` of a checkpoint directory."""
  problems = hf_config_mismatches(read_hf_config(model_dir), model_config, vocab_size)
  if problems:
    raise ValueError(f"{os.fspath(_model_dir(model_dir))} does not fit the model config: " +
                     "; ".join(problems))


# ---- reading tensors: safetensors and torch's zip format, lazily -----------------------------


def _weight_files(model_dir_or_file: epath.PathLike) -> list[epath.Path]:
  """The weight file(s) of a checkpoint: safetensors preferred, then pytorch_model.bin."""
  path = epath.Path(model_dir_or_file)
  if path.is_file():
    if path.name.endswith(".index.json"):
      weight_map = json.loads(path.read_text())["weight_map"]
      return [path.parent / name for name in sorted(set(weight_map.values()))]
    return [path]
  if not path.is_dir():
    raise FileNotFoundError(f"No such checkpoint file or directory: {os.fspath(path)}")
  for single, index in ((WEIGHTS_FILENAME, WEIGHTS_INDEX_FILENAME),
                        (TORCH_WEIGHTS_FILENAME, TORCH_WEIGHTS_INDEX_FILENAME)):
    if (path / single).is_file():
      return [path / single]
    if (path / index).is_file():
      return _weight_files(path / index)
  raise FileNotFoundError(
      f"No {WEIGHTS_FILENAME}, {TORCH_WEIGHTS_FILENAME} or their .index.json in "
      f"{os.fspath(path)} (TensorFlow checkpoints are not supported).")


def _safetensors_loaders(file: epath.Path) -> dict[str, Loader]:
  path = os.fspath(file)
  with safe_open(path, framework="numpy") as f:
    names = list(f.keys())

  def loader(name):
    def load():
      with safe_open(path, framework="numpy") as g:
        return g.get_tensor(name)
    return load

  return {name: loader(name) for name in names}


_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


@dataclasses.dataclass(frozen=True)
class _TorchStorage:
  key: str
  dtype: Any


@dataclasses.dataclass(frozen=True)
class _TorchTensor:
  """A tensor of a torch zip checkpoint, not yet read: storage, offset, shape, strides."""

  storage: _TorchStorage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _TorchTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Reads `data.pkl` of a torch zip checkpoint without torch, allowing only the globals a
  state dict of tensors needs (so a crafted file cannot run code)."""

  _ALLOWED = {
      ("collections", "OrderedDict"): dict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return name
    raise pickle.UnpicklingError(
        f"{module}.{name} is not part of a plain tensor state dict; refusing to unpickle it "
        "(convert the checkpoint to safetensors).")

  def persistent_load(self, pid):
    kind, storage_type, key, *_ = pid
    if kind != "storage" or storage_type not in _TORCH_STORAGE_DTYPES:
      raise pickle.UnpicklingError(f"Unsupported torch storage {pid!r}.")
    return _TorchStorage(str(key), _TORCH_STORAGE_DTYPES[storage_type])


def _torch_bin_loaders(file: epath.Path) -> dict[str, Loader]:
  path = os.fspath(file)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a torch zip checkpoint (torch >= 1.6 format); the legacy "
                     "format needs torch: convert it to safetensors.")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}.")
    root = pickles[0][:-len("data.pkl")]
    with archive.open(pickles[0]) as f:
      state = _TorchUnpickler(f).load()
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")

  def loader(tensor: _TorchTensor):
    def load():
      dtype = tensor.storage.dtype
      np_dtype = np.dtype(jnp.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
      with zipfile.ZipFile(path) as archive:
        raw = archive.read(f"{root}data/{tensor.storage.key}")
      flat = np.frombuffer(raw, dtype=np_dtype.newbyteorder("<"))
      if not tensor.shape:
        return np.array(flat[tensor.offset])
      strided = np.lib.stride_tricks.as_strided(
          flat[tensor.offset:], shape=tensor.shape,
          strides=[s * np_dtype.itemsize for s in tensor.stride])
      return np.array(strided, dtype=np_dtype.newbyteorder("="))
    return load

  loaders = {}
  for name, value in state.items():
    if not isinstance(value, _TorchTensor):
      raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor.")
    loaders[name] = loader(value)
  return loaders


def read_hf_tensor_loaders(model_dir_or_file: epath.PathLike) -> dict[str, Loader]:
  """Tensor name -> zero-argument loader (numpy), over every weight file of a checkpoint."""
  loaders: dict[str, Loader] = {}
  for file in _weight_files(model_dir_or_file):
    if not file.is_file():
      raise FileNotFoundError(f"Checkpoint shard {os.fspath(file)} is missing.")
    if file.name.endswith(".bin"):
      these = _torch_bin_loaders(file)
    else:
      these = _safetensors_loaders(file)
    for name, load in these.items():
      if name in loaders:
        raise ValueError(f"Tensor {name!r} appears in more than one shard ({os.fspath(file)}).")
      loaders[name] = load
  return loaders


# ---- one BERT body, and the heads ------------------------------------------------------------


def _listing(names: list[str], limit: int = 12) -> str:
  """Names for an error message, at most `limit` of them."""
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _linear(hf: str, path: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], bool]]:
  return {f"{hf}.weight": (path + ("kernel",), True), f"{hf}.bias": (path + ("bias",), False)}


def _layer_norm(hf: str, path: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], bool]]:
  return {f"{hf}.weight": (path + ("scale",), False), f"{hf}.bias": (path + ("bias",), False)}


def _legacy_norm_name(name: str) -> str:
  """Old BERT checkpoints name LayerNorm parameters gamma/beta."""
  if ".LayerNorm." in name or name.startswith("LayerNorm."):
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
  return name


def _expected_names(num_layers: int, with_mlm_head: bool, with_pooler: bool
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
  if with_pooler:
    names.update(_linear("pooler.dense", ("pooler", "dense")))
  if with_mlm_head:
    head = ("cls", "predictions")
    names["cls.predictions.bias"] = (head + ("bias",), False)
    names.update(_linear("cls.predictions.transform.dense", head + ("transform", "dense")))
    names.update(_layer_norm("cls.predictions.transform.LayerNorm",
                             head + ("transform", "LayerNorm")))
  return names


def _take_mlm_decoder(tensors: dict[str, Loader], source: str) -> None:
  """Folds HF's tied MLM decoder into our layout (our decoder is the word-embedding table).

  The decoder bias is the same parameter as `cls.predictions.bias` in HF; an untied decoder
  weight cannot be represented and is an error. (safetensors checkpoints often store only
  one of two tied tensors; either is fine.)
  """
  weight = tensors.pop("cls.predictions.decoder.weight", None)
  if weight is not None:
    words = tensors.get("embeddings.word_embeddings.weight")
    if words is None or not np.array_equal(weight(), words()):
      raise ValueError(
          f"{source}: cls.predictions.decoder.weight differs from the word embeddings, and our "
          "MLM head ties them, so this untied decoder cannot be loaded.")
  bias = tensors.pop("cls.predictions.decoder.bias", None)
  if bias is not None:
    other = tensors.setdefault("cls.predictions.bias", bias)
    if other is not bias and not np.array_equal(other(), bias()):
      raise ValueError(f"{source}: cls.predictions.decoder.bias differs from "
                       "cls.predictions.bias.")


def _convert(tensors: Mapping[str, Loader], expected, source: str, what: str) -> Params:
  unexpected = sorted(set(tensors) - set(expected))
  missing = sorted(set(expected) - set(tensors))
  if unexpected:
    raise ValueError(f"{source}: tensors with no place in our {what}: {_listing(unexpected)}")
  if missing:
    raise ValueError(f"{source}: missing {what} tensors: {_listing(missing)}")
  flat = {}
  for name, (path, transpose) in expected.items():
    value = np.asarray(tensors[name]()).astype(np.float32)  # also fp16 / bf16 checkpoints
    flat[path] = np.ascontiguousarray(value.T) if transpose else value
  return flax.traverse_util.unflatten_dict(flat)


def _bert_body(tensors: Mapping[str, Loader], source: str, *, mlm_head: bool,
               pooler: bool, num_layers: int | None) -> Params:
  """Our BertModel tree (plus `cls` with `mlm_head`) from prefix-free HF BERT names."""
  tensors = {_legacy_norm_name(n): v for n, v in tensors.items() if not _IGNORED.match(n)}
  if not pooler:
    tensors = {n: v for n, v in tensors.items() if not n.startswith("pooler.")}
  if mlm_head:
    _take_mlm_decoder(tensors, source)
  layer_ids = {int(m.group(1)) for m in map(_LAYER.match, tensors) if m}
  found = max(layer_ids, default=-1) + 1
  if num_layers is not None and num_layers != found:
    raise ValueError(f"{source}: config.json says num_hidden_layers={num_layers} but the "
                     f"weights have {found} layers.")
  has_head = mlm_head and any(n.startswith(_MLM_PREFIX) for n in tensors)
  has_pooler = pooler and any(n.startswith("pooler.") for n in tensors)
  return _convert(tensors, _expected_names(found, has_head, has_pooler), source, "BERT")


def _strip(tensors: Mapping[str, Loader], prefix: str) -> dict[str, Loader]:
  return {n[len(prefix):]: v for n, v in tensors.items() if n.startswith(prefix)}


def checkpoint_kind(names: Iterable[str]) -> str:
  """Which HF class wrote a state dict, from its tensor names (see the module docstring)."""
  names = set(names)
  starts = lambda prefix: any(n.startswith(prefix) for n in names)
  if starts("reader.") or starts("embedder."):
    return "realm_openqa" if starts("reader.") else "realm_scorer"
  if starts("realm."):
    if starts("qa_outputs."):
      return "realm_reader"
    if "cls.dense.weight" in names:
      return "realm_embedder"
    return "realm_encoder"
  return "bert"


def _realm_embedder(tensors, source) -> Params:
  """RealmEmbedder names (prefix stripped) -> our Embedder tree."""
  body = _bert_body(_strip(tensors, "realm."), source, mlm_head=False, pooler=True,
                    num_layers=None)
  if "pooler" not in body:
    raise ValueError(f"{source}: an HF REALM embedder without realm.pooler.dense: the "
                     "retriever embeds BERT's pooled output.")
  heads = {n: v for n, v in tensors.items() if n.startswith("cls.") and
           not n.startswith(_MLM_PREFIX)}  # cls.predictions: unused by RealmEmbedder.forward
  expected = {**_linear("cls.dense", ("projection",)),
              **_layer_norm("cls.LayerNorm", ("LayerNorm",))}
  return {"bert": body, **_convert(heads, expected, source, "embedder projection")}


def _realm_encoder(tensors, source) -> Params:
  body = _bert_body({**_strip(tensors, "realm."), **_strip_keep(tensors, _MLM_PREFIX)}, source,
                    mlm_head=True, pooler=False, num_layers=None)
  if "cls" not in body:
    raise ValueError(f"{source}: an HF RealmKnowledgeAugEncoder checkpoint without its MLM "
                     "head (cls.predictions.*).")
  head = body.pop("cls")
  return {"bert": body, "cls": head}


def _strip_keep(tensors, prefix):
  return {n: v for n, v in tensors.items() if n.startswith(prefix)}


def _realm_reader(tensors, source) -> Params:
  body = _bert_body(_strip(tensors, "realm."), source, mlm_head=False, pooler=False,
                    num_layers=None)
  heads = _strip_keep(tensors, "qa_outputs.")  # cls.predictions: unused by RealmReader
  expected = {**_linear("qa_outputs.dense_intermediate", ("qa_outputs", "dense_intermediate")),
              **_linear("qa_outputs.dense_output", ("qa_outputs", "dense_output")),
              **_layer_norm("qa_outputs.layer_normalization",
                            ("qa_outputs", "layer_normalization"))}
  return {"bert": body, **_convert(heads, expected, source, "reader span head")}


@dataclasses.dataclass
class HFCheckpoint:
  """An HF checkpoint converted to our module trees (numpy float32).

  towers: "embedder" (an `Embedder` tree), "encoder" (a `KnowledgeAugmentedEncoder` tree),
  "reader" (a `SpanReader` tree) or, for plain BERT, "bert" (a `BertModel` tree, plus "cls"
  when it has an MLM head). config: its config.json, or None when there is none.
  """

  kind: str
  towers: dict[str, Params]
  config: dict[str, Any] | None
  source: str
  skipped: list[str]


_SINGLE_TOWER_PREFIXES = {"realm_embedder": ("realm.", "cls."),
                          "realm_encoder": ("realm.", "cls."),
                          "realm_reader": ("realm.", "cls.", "qa_outputs.")}


def _skipped_names(kind: str, names: Iterable[str]) -> list[str]:
  """The checkpoint tensors no forward pass reads, for the record (see the module docstring)."""
  def skipped(name):
    if name == "block_emb" or _IGNORED.match(name.split(".", 1)[-1]) or _IGNORED.match(name):
      return True
    if kind != "bert" and ".cls.predictions." in f".{name}" and kind != "realm_encoder":
      return True  # RealmEmbedder's / RealmReader's unused MLM heads
    in_reader_or_encoder = kind in ("realm_encoder", "realm_reader") or name.startswith("reader.")
    return in_reader_or_encoder and ".pooler." in f".{name}"
  return sorted(n for n in names if skipped(n))


def load_hf_checkpoint(model_dir_or_file: epath.PathLike) -> HFCheckpoint:
  """Reads any layout of the module docstring; errors name the tensors and the real cause."""
  loaders = read_hf_tensor_loaders(model_dir_or_file)
  files = _weight_files(model_dir_or_file)
  source = ", ".join(os.fspath(f) for f in files)
  config_file = files[0].parent / CONFIG_FILENAME
  config = json.loads(config_file.read_text()) if config_file.is_file() else None
  kind = checkpoint_kind(loaders)
  layers = None if config is None else config.get("num_hidden_layers")
  towers: dict[str, Params] = {}
  skipped = _skipped_names(kind, loaders)
  if kind == "bert":
    bert_loaders = {n.removeprefix("bert."): v for n, v in loaders.items()}
    towers["bert"] = _bert_body(bert_loaders, source, mlm_head=True, pooler=True,
                                num_layers=layers)
  elif kind in _SINGLE_TOWER_PREFIXES:
    unknown = sorted(n for n in loaders if not n.startswith(_SINGLE_TOWER_PREFIXES[kind]))
    if unknown:
      raise ValueError(f"{source}: an HF {kind} layout with tensors outside "
                       f"{'/'.join(_SINGLE_TOWER_PREFIXES[kind])}: {_listing(unknown)}")
  if kind == "realm_embedder":
    towers["embedder"] = _realm_embedder(loaders, source)
  elif kind == "realm_encoder":
    towers["encoder"] = _realm_encoder(loaders, source)
  elif kind == "realm_reader":
    towers["reader"] = _realm_reader(loaders, source)
  elif kind in ("realm_scorer", "realm_openqa"):
    unknown = sorted(n for n in loaders if not n.startswith(("embedder.", "reader.")) and
                     n != "block_emb")
    if unknown:
      raise ValueError(f"{source}: a RealmScorer/RealmForOpenQA layout with tensors outside "
                       f"embedder.* and reader.*: {_listing(unknown)}")
    towers["embedder"] = _realm_embedder(_strip(loaders, "embedder."), source)
    if kind == "realm_openqa":
      towers["reader"] = _realm_reader(_strip(loaders, "reader."), source)
  if kind != "bert" and layers is not None:
    for name, tree in towers.items():
      found = len(tree["bert"]["encoder"]["layer"])
      if found != layers:
        raise ValueError(f"{source}: config.json says num_hidden_layers={layers} but the "
                         f"{name} weights have {found} layers.")
  return HFCheckpoint(kind, towers, config, source, skipped)


def load_hf_bert_params(model_dir_or_file: epath.PathLike) -> Params:
  """Reads an HF *BERT* checkpoint into our BertModel's parameter layout (numpy float32).

  Returns `{"embeddings", "encoder"}`, plus `"pooler"` and `{"cls": {"predictions": ...}}`
  when the checkpoint has them; pass the tree without "cls" to `BertModel.apply`. The
  next-sentence head and position-id buffers are skipped; any other unknown tensor, and any
  missing one, is a ValueError naming them. An HF REALM checkpoint (`realm.*` names) is an
  error that says so: load it with `load_hf_checkpoint` / `apply_hf_checkpoint`, which also
  take its projection, MLM or span heads.
  """
  checkpoint = load_hf_checkpoint(model_dir_or_file)
  if checkpoint.kind != "bert":
    raise ValueError(
        f"{checkpoint.source} is an HF REALM checkpoint ({checkpoint.kind}: towers "
        f"{sorted(checkpoint.towers)}), not a plain BERT: load it with "
        "hf_weights.load_hf_checkpoint and hf_weights.apply_hf_checkpoint.")
  return checkpoint.towers["bert"]


# ---- into a model's parameter tree --------------------------------------------------------


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


def _replace(flat: dict[str, Any], replacements: Mapping[str, Any], tower: str,
             must_cover: str, source: str) -> None:
  """Sets `replacements` in `flat`; every model leaf under `must_cover` must be replaced."""
  covered = {k for k in flat if k.startswith(must_cover)}
  extra = sorted(set(replacements) - set(flat))
  uncovered = sorted(covered - set(replacements))
  if extra:
    hint = ""
    if any("/pooler/" in k for k in extra):
      hint = (" (the checkpoint's pooler has no place: is the model's embedder built with "
              "pooler=False / model.embedder_pooler=False?)")
    raise ValueError(f"{source}: checkpoint parameters with no place in the model's {tower}: "
                     f"{_listing(extra)}{hint}")
  if uncovered:
    raise ValueError(f"{source}: model parameters of {tower} the checkpoint does not have: "
                     f"{_listing(uncovered)}")
  for path, value in replacements.items():
    target = flat[path]
    flat[path] = jnp.asarray(_fit(path, np.asarray(value), target), dtype=target.dtype)


def _flat(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  return {f"{prefix}{k}": v for k, v in
          flax.traverse_util.flatten_dict(dict(tree), sep="/").items()}


def apply_to_realm_params(params: Mapping[str, Any], bert_params: Mapping[str, Any],
                          towers: Iterable[str] = REALM_TOWERS) -> Params:
  """A copy of model params with each present tower's BERT set from plain-BERT `bert_params`.

  `bert_params` comes from `load_hf_bert_params`. Every BERT leaf of a tower is replaced (a
  leaf missing on either side, or a shape difference, is a ValueError naming its path), except
  the pooler: it goes to towers that have one (the embedders), and a checkpoint without one
  leaves theirs as they were. The position table is cut to the model's length (see `_fit`).
  The checkpoint's MLM head, if it has one, also goes to `encoder/cls/predictions`. Heads the
  checkpoint lacks (the embedder's projection and LayerNorm, a missing MLM head, the reader's
  span head) keep their values.
  """
  towers = tuple(towers)
  frozen = isinstance(params, flax.core.FrozenDict)
  flat = flax.traverse_util.flatten_dict(params if frozen else dict(params), sep="/")
  source = flax.traverse_util.flatten_dict(dict(bert_params), sep="/")
  bert_source = {k: v for k, v in source.items()
                 if not k.startswith("cls/") and not k.startswith("pooler/")}
  pooler_source = {k: v for k, v in source.items() if k.startswith("pooler/")}
  head_source = {k: v for k, v in source.items() if k.startswith("cls/")}
  present = [tower for tower in towers if any(k.startswith(f"{tower}/") for k in flat)]
  if not present:
    raise ValueError(f"None of the towers {towers} is in the parameters; they have "
                     f"{sorted({k.split('/')[0] for k in flat})}.")
  for tower in present:
    replacements = {f"{tower}/bert/{k}": v for k, v in bert_source.items()}
    model_pooler = any(k.startswith(f"{tower}/bert/pooler/") for k in flat)
    if model_pooler:
      replacements.update({f"{tower}/bert/{k}": v for k, v in pooler_source.items()})
      if not pooler_source:  # keep the model's own pooler
        replacements.update({k: v for k, v in flat.items()
                             if k.startswith(f"{tower}/bert/pooler/")})
    if tower == "encoder":
      replacements.update({f"{tower}/{k}": v for k, v in head_source.items()})
    _replace(flat, replacements, tower, f"{tower}/bert/", "the BERT checkpoint")
  out = flax.traverse_util.unflatten_dict(flat, sep="/")
  return flax.core.freeze(out) if frozen else out


# Which model trees each checkpoint tower may fill.
_TARGETS = {"embedder": EMBEDDER_TOWERS, "encoder": ("encoder",), "reader": ("reader",)}


def split_hf_paths(checkpoints: Any) -> list[str]:
  """`model.init_from_hf` as a list of checkpoint folders: one path, a comma-separated string
  ("…-embedder,…-encoder": HF ships REALM's towers as separate checkpoints) or a sequence."""
  if isinstance(checkpoints, (str, os.PathLike)):
    checkpoints = os.fspath(checkpoints).split(",")
  paths = [os.fspath(p).strip() for p in checkpoints]
  if not paths or not all(paths):
    raise ValueError(f"model.init_from_hf={checkpoints!r}: an empty checkpoint path")
  return paths


def _realm_placements(checkpoint: HFCheckpoint, have: Sequence[str], towers: Sequence[str]
                      ) -> list[tuple[str, Params, str]]:
  """(model tower, the checkpoint tree it gets, the prefix every model leaf under which the
  tree must cover) for an HF REALM checkpoint. An encoder checkpoint with no `encoder` in the
  model (an `OpenQAModel`) starts the reader's BERT, as REALM's fine-tuning does; its MLM head
  and the reader's span head are left out."""
  out = []
  for name, tree in checkpoint.towers.items():
    targets = [t for t in _TARGETS[name] if t in towers and t in have]
    if not targets and name == "encoder" and "reader" in towers and "reader" in have:
      out.append(("reader", {"bert": tree["bert"]}, "reader/bert/"))
      continue
    if not targets:
      raise ValueError(f"{checkpoint.source}: the checkpoint's {name} ({checkpoint.kind}) has "
                       f"no place in the model, whose parameters are {list(have)}.")
    out.extend((target, tree, f"{target}/") for target in targets)
  return out


def _provided_paths(checkpoint: HFCheckpoint, flat: Mapping[str, Any], towers: Sequence[str]
                    ) -> set[str]:
  """The model leaves (flat "/" paths) `apply_hf_checkpoint` would set from `checkpoint`."""
  have = sorted({k.split("/")[0] for k in flat})
  if checkpoint.kind == "bert":
    source = flax.traverse_util.flatten_dict(dict(checkpoint.towers["bert"]), sep="/")
    out = set()
    for tower in (t for t in towers if t in have):
      out |= {f"{tower}/bert/{k}" for k in source if not k.startswith("cls/")}
      if tower == "encoder":
        out |= {f"{tower}/{k}" for k in source if k.startswith("cls/")}
    return out & set(flat)
  return {path for target, tree, _ in _realm_placements(checkpoint, have, towers)
          for path in _flat(tree, f"{target}/")}


def apply_hf_checkpoints(params: Mapping[str, Any], checkpoints: Any, model_config: Any = None,
                         vocab_size: int | None = None,
                         towers: Iterable[str] = REALM_TOWERS) -> Params:
  """`apply_hf_checkpoint` for several checkpoints (`split_hf_paths`), e.g. HF's
  `google/realm-cc-news-pretrained-embedder` and `-encoder` folders into one model.

  Each checkpoint is checked against `model_config` on its own. Two checkpoints that would set
  the same parameter are a ValueError naming both and the parameters (no silent "last one
  wins").
  """
  towers = tuple(towers)
  if isinstance(checkpoints, HFCheckpoint):
    checkpoints = [checkpoints]
  elif isinstance(checkpoints, (str, os.PathLike)):
    checkpoints = split_hf_paths(checkpoints)
  checkpoints = [c if isinstance(c, HFCheckpoint) else load_hf_checkpoint(split_hf_paths(c)[0])
                 for c in checkpoints]
  frozen = isinstance(params, flax.core.FrozenDict)
  flat = flax.traverse_util.flatten_dict(params if frozen else dict(params), sep="/")
  provided: dict[str, str] = {}
  for checkpoint in checkpoints:
    paths = _provided_paths(checkpoint, flat, towers)
    clash = sorted(p for p in paths if p in provided)
    if clash:
      raise ValueError(
          f"model.init_from_hf: {provided[clash[0]]} and {checkpoint.source} both provide "
          f"{len(clash)} parameters, e.g. {_listing(clash, 4)}; give each tower once (e.g. "
          "the REALM embedder folder and the encoder folder)")
    provided.update(dict.fromkeys(paths, checkpoint.source))
  for checkpoint in checkpoints:
    params = apply_hf_checkpoint(params, checkpoint, model_config, vocab_size, towers)
  return params


def apply_hf_checkpoint(params: Mapping[str, Any], checkpoint: HFCheckpoint | epath.PathLike,
                        model_config: Any = None, vocab_size: int | None = None,
                        towers: Iterable[str] = REALM_TOWERS) -> Params:
  """A copy of model params (RealmModel or OpenQAModel) with what an HF checkpoint holds.

  `checkpoint` may also name several folders (a comma-separated string or a sequence, see
  `apply_hf_checkpoints`). A plain BERT goes through `apply_to_realm_params`. An HF REALM
  checkpoint replaces whole towers: its embedder every embedder of the model (`embedder`, or
  `query_embedder` and `doc_embedder`), its encoder `encoder` (in an `OpenQAModel`, which has
  none: the reader's BERT), its reader `reader`; every leaf of a filled tower
  must be in the checkpoint and vice versa (ValueError naming the paths). A checkpoint tower
  with no place in the model is an error, a model tower the checkpoint lacks keeps its values.
  With `model_config` (config.model or a BertConfig), `hf_config_mismatches` first: any
  mismatch is a ValueError listing each field.
  """
  if not isinstance(checkpoint, HFCheckpoint):
    if not isinstance(checkpoint, (str, os.PathLike)) or len(split_hf_paths(checkpoint)) > 1:
      return apply_hf_checkpoints(params, checkpoint, model_config, vocab_size, towers)
    checkpoint = load_hf_checkpoint(split_hf_paths(checkpoint)[0])
  if model_config is not None:
    if checkpoint.config is None:
      raise ValueError(f"{checkpoint.source}: no {CONFIG_FILENAME} beside the weights, so "
                       "activation and LayerNorm epsilon cannot be checked.")
    problems = hf_config_mismatches(checkpoint.config, model_config, vocab_size)
    if problems:
      raise ValueError(f"{checkpoint.source} does not fit the model config: " +
                       "; ".join(problems))
  if checkpoint.kind == "bert":
    return apply_to_realm_params(params, checkpoint.towers["bert"], towers)
  towers = tuple(towers)
  frozen = isinstance(params, flax.core.FrozenDict)
  flat = flax.traverse_util.flatten_dict(params if frozen else dict(params), sep="/")
  have = sorted({k.split("/")[0] for k in flat})
  for target, tree, must_cover in _realm_placements(checkpoint, have, towers):
    _replace(flat, _flat(tree, f"{target}/"), target, must_cover, checkpoint.source)
  out = flax.traverse_util.unflatten_dict(flat, sep="/")
  return flax.core.freeze(out) if frozen else out
