"""realm_jax.qa.data: the ORQA JSONL reader, bad-line accounting, the hash split, facts questions."""

import hashlib
import json

import pytest

from realm_jax.data import facts_corpus
from realm_jax.qa import data


def _lines(*records):
  return [r if isinstance(r, str) else json.dumps(r) for r in records]


def test_reads_good_lines_and_counts_each_bad_reason():
  lines = _lines(
      {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"],
       "id": "q1"},
      '{"question": "broken json", "answer": [',
      "[1, 2]",
      {"answer": ["x"]},
      {"question": "   ", "answer": ["x"]},
      {"question": "no answer field"},
      {"question": "empty list", "answer": []},
      {"question": "blank answers", "answer": ["", "  "]},
      {"question": "numeric answer", "answer": [1990]},
      "",  # blank: skipped, not counted
      {"question": "  where is paris  ", "answer": "France"},
  )
  examples, report = data.read_jsonl_lines(lines, "nq", "mem")
  assert [e.question for e in examples] == ["who wrote hamlet", "where is paris"]
  assert examples[0].answers == ("Shakespeare", "William Shakespeare")
  assert examples[0].example_id == "q1"
  assert examples[1].example_id == "11"  # line number when the line has no id
  assert examples[1].answers == ("France",)
  assert report.num_lines == 10 and report.num_examples == 2 and report.num_bad == 8
  assert dict(report.bad) == {"bad_json": 1, "not_an_object": 1, "missing_question": 1,
                              "empty_question": 1, "missing_answer": 1, "empty_answer": 2,
                              "answer_not_string": 1}
  assert report.first_bad_line["empty_answer"] == 7
  assert "bad_json: 1 (first at line 2)" in report.summary()


def test_trec_regex_that_does_not_compile_is_a_bad_line():
  lines = _lines({"question": "how hot is the sun", "answer": ["(5,?778|6,?[05]00)\\s*K"]},
                 {"question": "bad pattern", "answer": ["Sept?(ember"]})
  examples, report = data.read_jsonl_lines(lines, "trec")
  assert len(examples) == 1 and examples[0].answer_kind == "regex"
  assert dict(report.bad) == {"bad_regex": 1}
  # The same unbalanced string is a fine literal answer for NQ.
  examples, report = data.read_jsonl_lines(lines, "nq")
  assert len(examples) == 2 and report.num_bad == 0


def test_zero_usable_examples_is_an_error():
  with pytest.raises(ValueError, match="No usable question.*missing_answer: 1"):
    data.read_jsonl_lines(_lines({"question": "q"}), "wq")


def test_unknown_dataset_is_a_clear_error():
  with pytest.raises(ValueError, match="qa.dataset='squad' is not one of"):
    data.read_jsonl_lines(_lines({"question": "q", "answer": ["a"]}), "squad")


def test_read_jsonl_from_file_and_missing_file(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(_lines({"question": "q1", "answer": ["a"]}, "not json")) + "\n")
  examples, report = data.read_jsonl(path, "nq")
  assert len(examples) == 1 and dict(report.bad) == {"bad_json": 1}
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.read_jsonl(tmp_path / "absent.jsonl", "nq")


def test_question_bucket_is_sha256_mod_10():
  question = "who sings ain't nothing but a good time"
  expected = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 10
  assert data.question_bucket(question) == expected


def test_split_is_deterministic_and_disjoint():
  examples = [data.QAExample(f"question number {i}", ("a",)) for i in range(200)]
  train, dev = data.split_train_dev(examples)
  train2, dev2 = data.split_train_dev(list(reversed(examples)))
  assert {e.question for e in dev} == {e.question for e in dev2}
  assert len(train) + len(dev) == 200 and not {e.question for e in train} & {
      e.question for e in dev}
  assert all(data.question_bucket(e.question) == 0 for e in dev)
  assert 5 <= len(dev) <= 40  # ~10%
  with pytest.raises(ValueError, match="too few examples"):
    data.split_train_dev(examples[:1])


def test_load_train_dev_splits_when_no_dev_file(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(json.dumps({"question": f"q {i}", "answer": ["a"]})
                            for i in range(50)))
  train, dev = data.load_train_dev("wq", str(path))
  assert len(train) + len(dev) == 50 and dev
  train, dev = data.load_train_dev("wq", str(path), str(path))
  assert len(train) == len(dev) == 50


def test_facts_questions_ask_about_held_out_facts():
  corpus = facts_corpus.generate_facts_corpus(num_entities=20, seed=3)
  eval_entities = {q.entity_id for q in corpus.eval_queries()}
  questions = data.facts_questions(corpus, "eval")
  assert questions and len({e.example_id for e in questions}) == len(questions)
  for example in questions:
    entity_id, attribute = example.example_id.split(":")
    entity = corpus.entities[int(entity_id)]
    assert entity.entity_id in eval_entities
    assert example.answers == (entity.attributes[attribute],)
    assert entity.full_name in example.question
    assert example.gold_doc_id == entity.entity_id  # the profile document
    profile = " ".join(corpus.docs[example.gold_doc_id].sentences)
    assert example.answers[0] in profile
  assert any(e.question.startswith("Where was ") for e in questions)
  train = data.facts_questions(corpus, "train")
  assert not {e.example_id for e in train} & {e.example_id for e in questions}


def test_a_line_that_is_not_utf8_is_counted(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_bytes(json.dumps({"question": "q1", "answer": ["a"]}).encode() + b"\n"
                   + b'{"question": "caf\xe9", "answer": ["x"]}\n')
  examples, report = data.read_jsonl(path, "nq")
  assert len(examples) == 1 and dict(report.bad) == {"bad_utf8": 1}


def test_shared_openqa_files_read_cleanly_when_present():
  import pathlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).parent.parent.parent / "shared" / "data" / "openqa"
  files = {"trec": "curatedtrec_train.jsonl", "nq": "nq_efficientqa_dev.jsonl",
           "wq": "webquestions_train.jsonl"}
  if not (root / files["trec"]).exists():
    pytest.skip("shared Open-QA data not on this machine")
  for dataset, name in files.items():
    examples, report = data.read_jsonl(root / name, dataset)
    assert report.num_examples == len(examples) > 1000, report.summary()
