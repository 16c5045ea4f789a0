"""WordPiece tokenizers in the BERT-uncased layout: train one on a corpus or load a vocab.txt."""

from __future__ import annotations

import collections
import dataclasses
import heapq
import os
from collections.abc import Iterable, Mapping

import tokenizers
from etils import epath
from tokenizers import decoders, models, normalizers, pre_tokenizers

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
  """Counts the normalized, pre-tokenized words of texts."""
  counts: collections.Counter[str] = collections.Counter()
  for text in texts:
    normalized = tokenizer.normalizer.normalize_str(text)
    counts.update(word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized))
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
  return vocab


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, output_dir: epath.PathLike
) -> tokenizers.Tokenizer:
  """Trains an uncased WordPiece vocab deterministically; writes output_dir/vocab.txt, loads it."""
  counter = _bert_tokenizer(models.WordPiece(unk_token="[UNK]"), lowercase=True)
  vocab = _learn_wordpiece_vocab(_word_counts(texts, counter), vocab_size)
  vocab_file = epath.Path(output_dir) / VOCAB_FILENAME
  vocab_file.parent.mkdir(parents=True, exist_ok=True)
  vocab_file.write_text("".join(token + "\n" for token in vocab))
  return load_tokenizer(vocab_file)


def load_tokenizer(vocab_file: epath.PathLike, lowercase: bool = True) -> tokenizers.Tokenizer:
  """BERT WordPiece tokenizer from a vocab.txt (no post-processor, truncation or padding)."""
  path = epath.Path(vocab_file)
  if not path.is_file():
    raise FileNotFoundError(f"WordPiece vocab file not found: {os.fspath(path)}")
  tokens = path.read_text().splitlines()
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"Duplicate tokens in vocab file {os.fspath(path)}.")
  if "[UNK]" not in vocab:
    raise ValueError(f"Vocab file {os.fspath(path)} has no [UNK] token.")
  tokenizer = _bert_tokenizer(
      models.WordPiece(vocab=vocab, unk_token="[UNK]",
                       continuing_subword_prefix=CONTINUATION_PREFIX),
      lowercase=lowercase,
  )
  tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
  return tokenizer
