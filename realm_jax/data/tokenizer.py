"""WordPiece tokenizers in the BERT-uncased layout: train one on a corpus or load a vocab.txt.

The vocabulary is learned here in Python, not with `tokenizers.trainers.WordPieceTrainer`: that
trainer is not deterministic. Its ties (equal pair counts, equal character counts) follow the
iteration order of Rust hash maps seeded at random per process, so the same corpus gives a
different token *set* from run to run (measured: 6 runs on the facts corpus at size=tiny gave
6 different vocabularies; PYTHONHASHSEED, TOKENIZERS_PARALLELISM=false and RAYON_NUM_THREADS=1
do not change that). Same corpus -> same vocab.txt is a guarantee of this module (a rebuilt
corpus must match the saved one), so ties here go to the smallest pair. Encoding is
`tokenizers`' own WordPiece model either way.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import os
from collections.abc import Iterable, Mapping, Sized

import tokenizers
from etils import epath
from tokenizers import decoders, models, normalizers, pre_tokenizers

from realm_jax import progress as progress_lib

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONTINUATION_PREFIX = "##"
VOCAB_FILENAME = "vocab.txt"


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of the special tokens, looked up by string so any BERT vocab works."""

  pad: int
  unk: int
  cls: int
  sep: int
  mask: int

  def as_tuple(self) -> tuple[int, ...]:
    """All special ids, in SPECIAL_TOKENS order."""
    return (self.pad, self.unk, self.cls, self.sep, self.mask)


def special_ids(tokenizer: tokenizers.Tokenizer) -> SpecialIds:
  """Looks up [PAD] [UNK] [CLS] [SEP] [MASK]; a vocab missing one is an error."""
  ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
  missing = [token for token, i in zip(SPECIAL_TOKENS, ids) if i is None]
  if missing:
    raise ValueError(f"Tokenizer vocabulary lacks special tokens {missing}.")
  return SpecialIds(*ids)


def _bert_tokenizer(model: models.WordPiece, lowercase: bool) -> tokenizers.Tokenizer:
  """Wraps a WordPiece model with BERT's normalizer, pre-tokenizer and decoder."""
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
  return tokenizer


def _word_counts(texts: Iterable[str], tokenizer: tokenizers.Tokenizer) -> collections.Counter[str]:
  """Counts the normalized, pre-tokenized words of texts.

  Progress is logged every 30 s for a sized collection of texts (an iterator's producer logs
  its own, e.g. wiki_data's records).
  """
  counts: collections.Counter[str] = collections.Counter()
  progress = (progress_lib.Progress("vocab: count words", len(texts), unit="texts",
                                    every_seconds=30.0) if isinstance(texts, Sized) else None)
  for text in texts:
    normalized = tokenizer.normalizer.normalize_str(text)
    counts.update(word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized))
    if progress is not None:
      progress.update(1)
  if progress is not None:
    progress.close()
  return counts


def _learn_wordpiece_vocab(word_counts: Mapping[str, int], vocab_size: int) -> list[str]:
  """WordPiece vocab by frequency-ranked merges; ties go to the smallest pair (deterministic).

  Same scheme as tokenizers' WordPieceTrainer (special tokens, the character alphabet, then
  merged pieces until vocab_size), whose ties follow hash order and differ from run to run.
  """
  words = sorted(word_counts)
  symbols = [[w[0], *(CONTINUATION_PREFIX + c for c in w[1:])] for w in words]
  vocab = list(SPECIAL_TOKENS) + sorted({s for word in symbols for s in word})
  known = set(vocab)
  pair_counts: collections.Counter[tuple[str, str]] = collections.Counter()
  pair_words: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
  for index, word in enumerate(symbols):
    for pair in zip(word, word[1:]):
      pair_counts[pair] += word_counts[words[index]]
      pair_words[pair].add(index)
  heap = [(-count, pair) for pair, count in pair_counts.items()]
  heapq.heapify(heap)
  progress = progress_lib.Progress("vocab: learn wordpieces", vocab_size, unit="tokens",
                                   start=len(vocab), every_seconds=30.0)
  while len(vocab) < vocab_size and heap:
    negative_count, pair = heapq.heappop(heap)
    count = pair_counts[pair]
    if count <= 0:
      continue
    if count != -negative_count:  # stale entry: requeue with the current count
      heapq.heappush(heap, (-count, pair))
      continue
    merged = pair[0] + pair[1].removeprefix(CONTINUATION_PREFIX)
    if merged not in known:
      vocab.append(merged)
      known.add(merged)
      progress.set(len(vocab))
    changed = set()
    for index in sorted(pair_words.pop(pair)):
      word, frequency = symbols[index], word_counts[words[index]]
      new_word, position = [], 0
      while position < len(word):
        if tuple(word[position:position + 2]) == pair:
          new_word.append(merged)
          position += 2
        else:
          new_word.append(word[position])
          position += 1
      for old_pair in zip(word, word[1:]):
        pair_counts[old_pair] -= frequency
      for new_pair in zip(new_word, new_word[1:]):
        pair_counts[new_pair] += frequency
        pair_words[new_pair].add(index)
        changed.add(new_pair)
      symbols[index] = new_word
    for new_pair in sorted(changed):
      if pair_counts[new_pair] > 0:
        heapq.heappush(heap, (-pair_counts[new_pair], new_pair))
  progress.close()
  return vocab


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, output_dir: epath.PathLike
) -> tokenizers.Tokenizer:
  """Trains an uncased WordPiece vocab deterministically; writes output_dir/vocab.txt, loads it.

  Texts without a single word are an error (a vocabulary of special tokens only is useless).
  """
  counter = _bert_tokenizer(models.WordPiece(unk_token="[UNK]"), lowercase=True)
  word_counts = _word_counts(texts, counter)
  if not word_counts:
    raise ValueError("train_wordpiece: the texts hold no word to learn a vocabulary from.")
  vocab = _learn_wordpiece_vocab(word_counts, vocab_size)
  logging.info("vocab: %d wordpieces (asked for %d) from %d distinct words", len(vocab),
               vocab_size, len(word_counts))
  vocab_file = epath.Path(output_dir) / VOCAB_FILENAME
  vocab_file.parent.mkdir(parents=True, exist_ok=True)
  vocab_file.write_text("".join(token + "\n" for token in vocab))
  return load_tokenizer(vocab_file)


def read_vocab_file(vocab_file: epath.PathLike) -> tuple[list[str], str]:
  """(tokens, text) of a vocab.txt: UTF-8, a byte-order mark dropped; clear errors otherwise."""
  path = epath.Path(vocab_file)
  if not path.is_file():
    raise FileNotFoundError(f"WordPiece vocab file not found: {os.fspath(path)}")
  try:
    text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
  except UnicodeDecodeError as e:
    raise ValueError(f"Vocab file {os.fspath(path)} is not UTF-8 text ({e}).") from e
  tokens = text.splitlines()
  if not tokens:
    raise ValueError(f"Vocab file {os.fspath(path)} is empty.")
  return tokens, text


def load_tokenizer(vocab_file: epath.PathLike, lowercase: bool = True) -> tokenizers.Tokenizer:
  """BERT WordPiece tokenizer from a vocab.txt (no post-processor, truncation or padding)."""
  path = epath.Path(vocab_file)
  tokens, _ = read_vocab_file(path)
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    duplicates = sorted(t for t, c in collections.Counter(tokens).items() if c > 1)
    raise ValueError(f"Duplicate tokens in vocab file {os.fspath(path)}: {duplicates[:10]}.")
  if "[UNK]" not in vocab:
    raise ValueError(f"Vocab file {os.fspath(path)} has no [UNK] token.")
  tokenizer = _bert_tokenizer(
      models.WordPiece(vocab=vocab, unk_token="[UNK]",
                       continuing_subword_prefix=CONTINUATION_PREFIX),
      lowercase=lowercase,
  )
  tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
  return tokenizer
