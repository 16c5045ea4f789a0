"""Small helpers shared by the data tests."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class PlainDoc:
  """Any document with a title and body sentences (what build_block_corpus accepts)."""

  title: str
  sentences: tuple[str, ...]


def ids(tokenizer, text):
  """Wordpiece ids of `text` without special tokens."""
  return tokenizer.encode(text, add_special_tokens=False).ids
