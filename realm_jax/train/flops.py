r"""Analytic model FLOPs of one REALM or ICT train step (the numerator of MFU).

Only matrix multiplications are counted, each as 2·m·n·k FLOPs (one multiply and one add per
multiply-accumulate, the convention of XLA's cost analysis and of MFU figures); embedding
lookups, LayerNorm, GELU, softmax, dropout, the loss and the optimizer update are left out.

Notation: H hidden, L layers, I intermediate (FFN) size, V vocabulary, D retrieval embedding
size (embed_dim), B queries per batch, k candidates per query (null document included),
Lq query length, Ld candidate document length, Lb = Ld - 2 candidate body length (the reader
drops `[CLS] title [SEP]` and keeps `body [SEP]`), M masked positions per query (max_masked),
T = Lq + Lb the reader's sequence length. Attention heads do not change the count.

One BERT layer on one sequence of length t:

    layer(t)      = 2·t·H·3H   (query, key, value)
                  + 2·t·t·H    (scores  q·kᵀ, all heads together)
                  + 2·t·t·H    (values  p·v)
                  + 2·t·H·H    (attention output dense)
                  + 2·t·H·I + 2·t·I·H   (feed-forward in and out)
                  = 8·t·H² + 4·t·H·I + 4·t²·H

    bert(n, t)    = n · L · layer(t)                         n sequences of length t
    embedder(n,t) = bert(n, t) + 2·n·H·D                     + projection of [CLS] to D
    mlm_head(r)   = 2·r·M·H·H + 2·r·M·H·V                    transform dense + tied output
                                                             projection, at the M masked
                                                             positions of r reader rows only

REALM forward (`RealmModel.__call__`):

    F_realm = embedder(B, Lq)          query embedder
            + embedder(B·k, Ld)        live re-embedding of the k candidates
            + 2·B·k·D                  retrieval scores Embed(x)·Embed(z)
            + bert(B·k, T)             knowledge-augmented encoder over [CLS] q [SEP] body [SEP]
            + mlm_head(B·k)

ICT forward (query and block embedders only; the encoder is frozen and not run):

    F_ict = embedder(B, Lq) + embedder(B, Ld) + 2·B·B·D     (in-batch score matrix, global B)

Train step = 3 × forward (the backward pass is 2 × forward: one matmul each for the gradient
with respect to the activations and to the weights). Rematerialization (`model.remat`) adds
recomputed FLOPs on the hardware but not model FLOPs, so MFU stays comparable across it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

BACKWARD_FACTOR = 2  # backward = 2 x forward
TRAIN_FACTOR = 1 + BACKWARD_FACTOR


@dataclasses.dataclass(frozen=True)
class ModelDims:
  """The shapes that set the FLOPs (num_heads is kept for the record; it changes nothing)."""

  hidden: int
  layers: int
  heads: int
  intermediate: int
  vocab: int
  embed_dim: int

  @classmethod
  def from_config(cls, config: Any, vocab_size: int | None = None) -> "ModelDims":
    """From an experiment config (`config.model`, vocabulary from `config.data.vocab_size`)."""
    m = config.model
    return cls(hidden=m.hidden_size, layers=m.num_layers, heads=m.num_heads,
               intermediate=m.intermediate_size,
               vocab=config.data.vocab_size if vocab_size is None else vocab_size,
               embed_dim=m.embed_dim)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Forward FLOPs by part; `forward` is their sum and `train_step` three times that."""

  parts: dict[str, int]

  @property
  def forward(self) -> int:
    return sum(self.parts.values())

  @property
  def train_step(self) -> int:
    return TRAIN_FACTOR * self.forward


def bert_layer_flops(seq_len: int, hidden: int, intermediate: int) -> int:
  """One transformer layer on one sequence: 8·t·H² + 4·t·H·I + 4·t²·H."""
  t, h, i = seq_len, hidden, intermediate
  return 8 * t * h * h + 4 * t * h * i + 4 * t * t * h


def attention_flops(num_seqs: int, seq_len: int, hidden: int) -> int:
  """Scores and value matmuls of one layer: 2 · (2·t·t·H) per sequence."""
  return num_seqs * 4 * seq_len * seq_len * hidden


def bert_flops(num_seqs: int, seq_len: int, dims: ModelDims) -> int:
  """The BERT encoder stack (no pooler, no output head) on n sequences of length t."""
  return num_seqs * dims.layers * bert_layer_flops(seq_len, dims.hidden, dims.intermediate)


def embedder_flops(num_seqs: int, seq_len: int, dims: ModelDims) -> int:
  """Retriever tower: BERT, then [CLS] -> dense(embed_dim)."""
  return bert_flops(num_seqs, seq_len, dims) + 2 * num_seqs * dims.hidden * dims.embed_dim


def mlm_head_flops(num_rows: int, max_masked: int, dims: ModelDims) -> int:
  """Transform dense (H x H) and tied output projection (H x V) at M positions of each row."""
  positions = num_rows * max_masked
  return 2 * positions * dims.hidden * dims.hidden + 2 * positions * dims.hidden * dims.vocab


def realm_step_flops(dims: ModelDims, batch_size: int, k: int, query_len: int, doc_len: int,
                     max_masked: int, body_len: int | None = None) -> StepFlops:
  """Forward FLOPs of one REALM step by part (see the module docstring for the formula)."""
  b = batch_size
  body_len = doc_len - 2 if body_len is None else body_len
  reader_len = query_len + body_len
  return StepFlops({
      "query_embedder": embedder_flops(b, query_len, dims),
      "doc_embedder": embedder_flops(b * k, doc_len, dims),
      "retrieval_scores": 2 * b * k * dims.embed_dim,
      "reader_encoder": bert_flops(b * k, reader_len, dims),
      "mlm_head": mlm_head_flops(b * k, max_masked, dims),
  })


def ict_step_flops(dims: ModelDims, batch_size: int, query_len: int,
                   doc_len: int) -> StepFlops:
  """Forward FLOPs of one ICT step by part (the global batch's B x B score matrix)."""
  b = batch_size
  return StepFlops({
      "query_embedder": embedder_flops(b, query_len, dims),
      "doc_embedder": embedder_flops(b, doc_len, dims),
      "retrieval_scores": 2 * b * b * dims.embed_dim,
  })


def realm_train_step_flops(dims: ModelDims, batch_size: int, k: int, query_len: int,
                           doc_len: int, max_masked: int) -> int:
  """3 x `realm_step_flops(...).forward`."""
  return realm_step_flops(dims, batch_size, k, query_len, doc_len, max_masked).train_step


def ict_train_step_flops(dims: ModelDims, batch_size: int, query_len: int, doc_len: int) -> int:
  """3 x `ict_step_flops(...).forward`."""
  return ict_step_flops(dims, batch_size, query_len, doc_len).train_step


def step_flops_from_config(config: Any, objective: str, batch_size: int, k: int,
                           vocab_size: int | None = None) -> StepFlops:
  """The step of `objective` ("realm" or "ict") with the config's model and sequence sizes."""
  dims = ModelDims.from_config(config, vocab_size)
  d = config.data
  if objective == "realm":
    return realm_step_flops(dims, batch_size, k, d.query_len, d.doc_len, d.max_masked)
  if objective == "ict":
    return ict_step_flops(dims, batch_size, d.query_len, d.doc_len)
  raise ValueError(f"objective must be 'realm' or 'ict', got {objective!r}")
