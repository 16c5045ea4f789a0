"""Look inside a run's index: what does the retriever return for a query? (`--mode=retrieve`)

For a trained run's workdir (its `config.json`, `checkpoints/`, published `index/` versions and
its prepared corpus) this encodes query texts the way pretraining queries are encoded
(`[CLS] wordpieces [SEP]`, cut to `data.query_len`, with the run's vocab.txt), embeds them with
the query embedder of the checkpoint the index version was built from, searches that version
and returns the top-k blocks with their titles and first words (from the corpus folder's
`block_texts.jsonl`):

```
[{"query": "...", "index_step": 30, "index_version": "30+2", "checkpoint_step": 30,
  "checkpoint_source": "index",
  "searcher": "exact", "num_query_tokens": 12, "truncated": false,
  "results": [{"rank": 1, "doc_id": 7, "score": 41.2, "title": "...", "text": "..."}, ...]}]
```
Which version: LATEST by default (a LATEST that is garbage, names a missing version or one that
fails `load_index`'s checks is skipped for the newest version that loads, with a note in
"warnings"), or exactly `index_step` (a VersionKey: `--index_step=30` or `30+2` for the
version over corpus version 2; an unpublished or invalid one is an error). `index_step` in the
records is the version's parameter step, `index_version` its full name. Which
parameters: the checkpoint of the version's parameter step (`checkpoint_step` or
`params_step` in its manifest when present, else the version's step; the index builder and
the in-process refresh both publish version <step> from the parameters of step <step>),
"checkpoint_source": "index"; when that checkpoint is no longer kept, the newest checkpoint,
"checkpoint_source": "newest", with a warning (its query embeddings are then not those the
index's document embeddings were made with).

Entry points: `Inspector` (load once, `search` many times), `retrieve` (one call),
`retrieve_file` (`{"query": ...}` JSONL in, results JSONL out, bad lines counted and reported),
`format_results` (text for the CLI) and `run_retrieve_mode` (what `--mode=retrieve` runs).
Every problem the caller can fix is one `RetrieveError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from realm_jax import config_lib
from realm_jax import storage
from realm_jax.data import corpus_versions
from realm_jax.data import prepare
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.retrieval import index_format
from realm_jax.train import checkpointing
from realm_jax.train import partitioning
from realm_jax.train import state as state_lib
from realm_jax.train import steps as steps_lib

TEXTS_FILE = "block_texts.jsonl"
SNIPPET_WORDS = 30
MAX_K = 1000
# Manifest keys that name the parameter step of a version built from other parameters than its
# own step's (e.g. an incremental version on a new corpus): the first one present wins.
PARAMS_STEP_KEYS = ("checkpoint_step", "params_step")
_EMBED_CHUNK = 256  # queries per embedding call (padded to a power of two: few compiles)
_MAX_BAD_SHOWN = 20


class RetrieveError(ValueError):
  """A workdir, index version, checkpoint or query that cannot be searched; names the cause."""


@dataclasses.dataclass(frozen=True)
class EncodedQuery:
  tokens: np.ndarray  # [query_len] int32: [CLS] wordpieces [SEP] pad...
  num_wordpieces: int  # before the cut to query_len - 2
  truncated: bool
  num_unknown: int  # [UNK] wordpieces among the kept ones


def encode_query(text: Any, tokenizer, special: tokenizer_lib.SpecialIds, query_len: int
                 ) -> EncodedQuery:
  """`[CLS] text [SEP]` padded to query_len, as pretraining queries (pipeline) are packed.

  RetrieveError for a non-string, an empty or blank text, or one without a single wordpiece.
  """
  if not isinstance(text, str):
    raise RetrieveError(f"a query must be a string, got {type(text).__name__} {text!r:.60}")
  if not text.strip():
    raise RetrieveError("empty query")
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  if not ids:
    raise RetrieveError(f"query {text!r:.80} tokenizes to nothing (no wordpiece in it)")
  kept = ids[:query_len - 2]
  packed = [special.cls, *kept, special.sep]
  tokens = np.full(query_len, special.pad, np.int32)
  tokens[:len(packed)] = packed
  return EncodedQuery(tokens=tokens, num_wordpieces=len(ids), truncated=len(ids) > len(kept),
                      num_unknown=sum(1 for i in kept if i == special.unk))


def snippet(text: str, words: int = SNIPPET_WORDS) -> str:
  """The first `words` words of text, "..." appended when cut."""
  parts = text.split()
  return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def read_block_texts(path: epath.PathLike, doc_ids: Iterable[int]) -> dict[int, dict[str, str]]:
  """{doc id: {"title", "text"}} for the wanted ids, in one streaming pass (wiki-sized files
  are not held in memory; the pass stops once every wanted id is found). A line's doc id is
  its "doc_id" field, else its line number."""
  wanted = {int(i) for i in doc_ids}
  found: dict[int, dict[str, str]] = {}
  if not wanted:
    return found
  with epath.Path(path).open("r") as f:
    for line_number, line in enumerate(f):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not isinstance(record, dict):
        continue
      doc_id = record.get("doc_id", line_number)
      if doc_id in wanted and doc_id not in found:
        found[doc_id] = dict(title=str(record.get("title", "")),
                             text=str(record.get("text", "")))
        if len(found) == len(wanted):
          break
  return found


def _params_step(manifest: dict[str, Any]) -> int:
  for key in PARAMS_STEP_KEYS:
    if isinstance(manifest.get(key), int):
      return manifest[key]
  return manifest["step"]


def _checkpoint_steps(workdir: epath.Path) -> list[int]:
  directory = workdir / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


class Inspector:
  """One run's index version, its embedder and corpus texts, loaded once for many searches."""

  def __init__(self, workdir: epath.PathLike, index_step: int | None = None,
               config: ml_collections.ConfigDict | None = None, devices=None):
    self.workdir = epath.Path(workdir)
    self.warnings: list[str] = []
    if not self.workdir.exists():
      raise RetrieveError(f"workdir {self.workdir} does not exist")
    if config is None:
      try:
        config = config_lib.load_run_config(self.workdir)
      except FileNotFoundError:
        raise RetrieveError(f"{self.workdir} holds no run config ({config_lib.RUN_CONFIG}): "
                            "not a trained run's workdir (or pass the run's --config)") from None
    self.config = config
    try:
      data = prepare.prepare_data(config, self.workdir, build=False)
    except FileNotFoundError as e:
      raise RetrieveError(f"the run's corpus is not there: {e}") from None
    except ValueError as e:  # built with other settings, too small for the config
      raise RetrieveError(f"the run's corpus cannot be used: {e}") from None
    self.corpus = data.corpus
    self.corpus_dir = data.directory
    self.tokenizer = tokenizer_lib.load_tokenizer(data.directory / tokenizer_lib.VOCAB_FILENAME)
    self.query_len = int(config.data.query_len)
    # (block_texts.jsonl, first id, stop id) per stored part (several for a corpus version)
    self.texts_paths = [(data.directory / TEXTS_FILE, 0, self.corpus.num_docs)]
    if not self.texts_paths[0][0].exists():
      self.warnings.append(f"{self.texts_paths[0][0]} is missing: titles from the corpus, text "
                           "decoded from its tokens")
    self._load_index(index_step)
    self._load_embedder(devices)

  # ---- set-up ----------------------------------------------------------------------------

  def _load_index(self, index_step: int | None):
    root = self.workdir / "index"
    versions = index_format.list_versions(root)
    expected = dict(expected_dim=int(self.config.model.embed_dim),
                    expected_num_docs=self.corpus.num_docs,
                    expected_fingerprint=self.corpus.fingerprint)
    if index_step is not None:
      if index_step not in versions:
        raise RetrieveError(f"index version {index_step} is not published in {root} "
                            f"(published: {versions or 'none'})")
      try:
        self.manifest, self.searcher = self._load_version(root, index_step, expected)
      except (index_format.IndexVersionError, corpus_versions.CorpusVersionError, OSError) as e:
        raise RetrieveError(f"index version {index_step} cannot be used: {e}") from None
      return
    if not versions:
      raise RetrieveError(f"no published index version in {root} (train the run, or start "
                          "its index builder)")
    try:
      latest = index_format.latest_step(root)
    except index_format.IndexVersionError as e:
      latest = None
      self.warnings.append(f"{root / index_format.LATEST}: {e}; using the newest valid version")
    if latest is not None and latest not in versions:
      self.warnings.append(f"LATEST names version {latest}, which is not published; using the "
                           "newest valid version")
    order = ([latest] if latest in versions else []) + [
        s for s in reversed(versions) if s != latest]
    problems = []
    for step in order:
      try:
        self.manifest, self.searcher = self._load_version(root, step, expected)
        break
      except (index_format.IndexVersionError, corpus_versions.CorpusVersionError, OSError) as e:
        problems.append(f"version {step}: {e}")
        self.warnings.append(f"skipped index version {step}: {e}")
    else:
      raise RetrieveError(f"no usable index version in {root}: {'; '.join(problems)}")

  def _load_version(self, root, step, expected):
    """load_index of one version; one over a corpus version (data/corpus_versions.py) is
    checked against that version, whose blocks and texts then answer the queries."""
    if isinstance(step, int) and not isinstance(step, index_format.VersionKey):
      step = next((v for v in index_format.list_versions(root) if v == step), step)
    number = index_format.read_manifest(root, step).get("corpus_version", 0)
    if not number:
      return index_format.load_index(root, step, **expected)
    version = corpus_versions.load_version(self.corpus_dir, number)
    loaded = index_format.load_index(root, step, expected_dim=expected["expected_dim"],
                                     expected_num_docs=version.corpus.num_docs,
                                     removed=version.removed,
                                     expected_fingerprint=version.corpus.fingerprint)
    self.corpus = version.corpus
    self.texts_paths = corpus_versions.text_files(version)
    return loaded

  def _load_embedder(self, devices):
    self.index_step = index_format.VersionKey(  # (step, corpus version): the version's name
        int(self.manifest["step"]), int(self.manifest.get("corpus_version", 0) or 0))
    wanted = _params_step(self.manifest)
    steps = _checkpoint_steps(self.workdir)
    if not steps:
      raise RetrieveError(f"no checkpoint in {self.workdir / 'checkpoints'}: nothing to embed "
                          "queries with")
    if wanted in steps:
      step, self.checkpoint_source = wanted, "index"
    else:
      step, self.checkpoint_source = steps[-1], "newest"
      self.warnings.append(
          f"index version {self.index_step} was built from the parameters of step {wanted}, "
          f"whose checkpoint is gone (kept: {steps}); queries are embedded with the newest "
          f"checkpoint, step {step}, so query and document embeddings come from different "
          "parameters")
    try:
      params, self.checkpoint_step = checkpointing.restore_embedder_params(
          self.workdir / "checkpoints", step)
    except (FileNotFoundError, ValueError) as e:
      raise RetrieveError(f"checkpoint {step} cannot be restored: {e}") from None
    device_list = list(devices) if devices is not None else jax.local_devices()[:1]
    self.mesh = partitioning.make_mesh([(partitioning.DATA_AXIS, 1)], device_list[:1])
    model = state_lib.build_model(self.config, self.corpus.vocab_size, self.corpus.special.pad)
    self._embed_queries, _ = steps_lib.make_embed_fns(model, self.mesh)
    self.params = partitioning.replicate(params, self.mesh)
    for warning in self.warnings:
      logging.warning("retrieve: %s", warning)

  # ---- queries ---------------------------------------------------------------------------

  def encode(self, text: Any) -> EncodedQuery:
    return encode_query(text, self.tokenizer, self.corpus.special, self.query_len)

  def embed(self, tokens: np.ndarray) -> np.ndarray:
    """[Q, query_len] int32 -> [Q, D] float32 query embeddings (the run's query embedder)."""
    tokens = np.asarray(tokens, np.int32)
    outputs = []
    for start in range(0, len(tokens), _EMBED_CHUNK):
      chunk = tokens[start:start + _EMBED_CHUNK]
      rows = 1 << max(0, (len(chunk) - 1).bit_length())  # a few shapes, a few compiles
      padded = np.full((rows, tokens.shape[1]), self.corpus.special.pad, np.int32)
      padded[:len(chunk)] = chunk
      outputs.append(np.asarray(self._embed_queries(self.params, padded))[:len(chunk)])
    return np.concatenate(outputs).astype(np.float32)

  def _texts(self, doc_ids: Iterable[int]) -> dict[int, dict[str, str]]:
    doc_ids = set(int(i) for i in doc_ids)
    found = {}
    for path, first, stop in self.texts_paths:  # each id read from the part that holds it
      wanted = {i for i in doc_ids if first <= i < stop}
      if wanted and path.exists():
        found.update(read_block_texts(path, wanted))
    for doc_id in doc_ids - set(found):  # no block_texts line: the corpus's own title/tokens
      body = np.asarray(self.corpus.reader_tokens[doc_id])
      body = body[:int(self.corpus.reader_lengths[doc_id])]
      found[doc_id] = dict(title=self.corpus.titles[doc_id],
                           text=self.tokenizer.decode(body.tolist(), skip_special_tokens=True))
    return found

  def search(self, queries: Sequence[str], k: int = 5, snippet_words: int = SNIPPET_WORDS
             ) -> list[dict[str, Any]]:
    """Top-k blocks of each query (see the module docstring for the record's fields)."""
    if isinstance(queries, str):
      raise RetrieveError("queries must be a list of strings, got one string")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= MAX_K:
      raise RetrieveError(f"k={k!r} must be an integer in [1, {MAX_K}]")
    if not queries:
      return []
    encoded = []
    for i, text in enumerate(queries):
      try:
        encoded.append(self.encode(text))
      except RetrieveError as e:
        raise RetrieveError(f"query {i}: {e}") from None
    query_emb = self.embed(np.stack([e.tokens for e in encoded]))
    ids, scores = self.searcher.search(query_emb, min(int(k), self.corpus.num_docs))
    texts = self._texts(np.unique(ids))
    out = []
    for text, enc, row_ids, row_scores in zip(queries, encoded, ids, scores):
      out.append(dict(
          query=text, index_step=int(self.index_step), index_version=str(self.index_step),
          checkpoint_step=int(self.checkpoint_step),
          checkpoint_source=self.checkpoint_source, searcher=self.manifest["searcher"],
          num_query_tokens=enc.num_wordpieces, truncated=enc.truncated,
          unknown_tokens=enc.num_unknown,
          results=[dict(rank=rank, doc_id=int(doc_id), score=float(score),
                        title=texts[int(doc_id)]["title"],
                        text=snippet(texts[int(doc_id)]["text"], snippet_words))
                   for rank, (doc_id, score) in enumerate(zip(row_ids, row_scores), start=1)]))
    return out


def retrieve(workdir: epath.PathLike, queries: list[str], k: int = 5,
             index_step: int | None = None, config: ml_collections.ConfigDict | None = None
             ) -> list[dict[str, Any]]:
  """Loads the run's index version and embedder, and returns the top-k of every query."""
  return Inspector(workdir, index_step=index_step, config=config).search(queries, k)


def read_queries_file(path: epath.PathLike, inspector: Inspector | None = None
                      ) -> tuple[list[tuple[int, str]], list[dict[str, Any]]]:
  """`{"query": ...}` JSONL -> ([(line number, text)], [{"line", "error"}] of bad lines).

  Blank lines are skipped; a line that is not JSON, not an object, has no string "query", an
  empty one or (with `inspector`) one that tokenizes to nothing is a bad line.
  """
  path = epath.Path(path)
  if not path.exists():
    raise RetrieveError(f"queries file {path} does not exist")
  good, bad = [], []
  with path.open("r") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        bad.append(dict(line=line_number, error=f"not JSON ({e.msg})"))
        continue
      if not isinstance(record, dict) or "query" not in record:
        bad.append(dict(line=line_number, error='not an object with a "query" field'))
        continue
      try:
        if inspector is not None:
          inspector.encode(record["query"])
        else:
          encode_query_text_check(record["query"])
      except RetrieveError as e:
        bad.append(dict(line=line_number, error=str(e)))
        continue
      good.append((line_number, record["query"]))
  return good, bad


def encode_query_text_check(text: Any) -> None:
  """The tokenizer-free part of `encode_query`'s checks (a string, not blank)."""
  if not isinstance(text, str):
    raise RetrieveError(f"a query must be a string, got {type(text).__name__}")
  if not text.strip():
    raise RetrieveError("empty query")


def _write_jsonl(path: epath.PathLike, records: Iterable[dict[str, Any]]) -> None:
  """Write-then-rename: a reader never sees half a results file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  storage.write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def retrieve_file(workdir: epath.PathLike, queries_path: epath.PathLike,
                  output_path: epath.PathLike | None = None, k: int = 5,
                  index_step: int | None = None,
                  config: ml_collections.ConfigDict | None = None,
                  inspector: Inspector | None = None) -> dict[str, Any]:
  """The batch form: every good line of a `{"query": ...}` JSONL searched.

  -> {"results": [record + "line"], "num_queries", "num_bad_lines", "bad_lines" (the first
  20: line number and cause), "index_step", "checkpoint_step", "checkpoint_source",
  "warnings", "output"}. With `output_path`, the records are written there as JSONL (one per
  good query, in file order). A file with no good query is an error.
  """
  inspector = inspector or Inspector(workdir, index_step=index_step, config=config)
  good, bad = read_queries_file(queries_path, inspector)
  if bad:
    logging.warning("retrieve: %d bad line(s) in %s, e.g. line %d: %s", len(bad), queries_path,
                    bad[0]["line"], bad[0]["error"])
  if not good:
    raise RetrieveError(f"{queries_path} holds no usable query ({len(bad)} bad line(s)"
                        f"{'; first: line %d: %s' % (bad[0]['line'], bad[0]['error']) if bad else ''})")
  results = inspector.search([text for _, text in good], k)
  for (line_number, _), record in zip(good, results):
    record["line"] = line_number
  if output_path is not None:
    _write_jsonl(output_path, results)
  return dict(results=results, num_queries=len(good), num_bad_lines=len(bad),
              bad_lines=bad[:_MAX_BAD_SHOWN], index_step=int(inspector.index_step),
              index_version=str(inspector.index_step),
              checkpoint_step=int(inspector.checkpoint_step),
              checkpoint_source=inspector.checkpoint_source,
              warnings=list(inspector.warnings),
              output=None if output_path is None else os.fspath(output_path))


def format_results(results: Sequence[dict[str, Any]], warnings: Sequence[str] = (),
                   bad_lines: Sequence[dict[str, Any]] = (), num_bad_lines: int | None = None
                   ) -> str:
  """Human-readable text of `retrieve`'s records, for the CLI."""
  lines = [f"warning: {w}" for w in warnings]
  if num_bad_lines or bad_lines:
    count = len(bad_lines) if num_bad_lines is None else num_bad_lines
    lines.append(f"{count} bad query line(s) skipped:")
    lines += [f"  line {b['line']}: {b['error']}" for b in bad_lines]
    if count > len(bad_lines):
      lines.append(f"  ... and {count - len(bad_lines)} more")
  for record in results:
    source = ("its own checkpoint" if record["checkpoint_source"] == "index"
              else "the NEWEST checkpoint (the index's own is gone)")
    where = f" (line {record['line']})" if "line" in record else ""
    lines.append(f"query{where}: {record['query']}")
    notes = [f"{record['num_query_tokens']} wordpieces"]
    if record.get("truncated"):
      notes.append("truncated to data.query_len")
    if record.get("unknown_tokens"):
      notes.append(f"{record['unknown_tokens']} unknown")
    lines.append(f"  index version {record.get('index_version', record['index_step'])} "
                 f"({record['searcher']}), query "
                 f"embedder of checkpoint {record['checkpoint_step']} ({source}); "
                 f"{', '.join(notes)}")
    for hit in record["results"]:
      lines.append(f"  {hit['rank']:>3}. {hit['score']:>10.4f}  doc {hit['doc_id']:<8d} "
                   f"{hit['title']}")
      if hit["text"]:
        lines.append(f"       {hit['text']}")
    lines.append("")
  return "\n".join(lines).rstrip("\n")


def run_retrieve_mode(workdir: epath.PathLike, query: str | None = None,
                      queries_file: epath.PathLike | None = None, k: int = 5,
                      index_step: int | None = None, output: epath.PathLike | None = None,
                      config: ml_collections.ConfigDict | None = None) -> str:
  """What `--mode=retrieve` runs: exactly one of `query` / `queries_file`; -> the text to print.

  `output`: the results as JSONL (one record per query) for either form.
  """
  if (query is None) == (queries_file is None):
    raise RetrieveError("give exactly one of --query and --queries")
  inspector = Inspector(workdir, index_step=index_step, config=config)
  if queries_file is not None:
    report = retrieve_file(workdir, queries_file, output, k=k, inspector=inspector)
    text = format_results(report["results"], report["warnings"], report["bad_lines"],
                          report["num_bad_lines"])
  else:
    results = inspector.search([query], k)
    if output is not None:
      _write_jsonl(output, results)
    text = format_results(results, inspector.warnings)
  if output is not None:
    text += f"\nresults written to {output}"
  return text
