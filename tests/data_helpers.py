"""Small helpers shared by the tests."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class PlainDoc:
  """Any document with a title and body sentences (what build_block_corpus accepts)."""

  title: str
  sentences: tuple[str, ...]


def ids(tokenizer, text):
  """Wordpiece ids of `text` without special tokens."""
  return tokenizer.encode(text, add_special_tokens=False).ids


def flip_byte(path, offset: int) -> None:
  """Corrupts one byte of a file in place (offset from the end when negative)."""
  data = bytearray(path.read_bytes())
  data[offset] ^= 0xFF
  path.write_bytes(bytes(data))
