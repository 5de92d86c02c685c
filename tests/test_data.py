"""Loading, validation, rendering, loss masks and batching of instruction data (qless.data)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from qless.data import (
    IGNORE_INDEX,
    DataConfig,
    Example,
    collate,
    load_examples,
    tokenize_examples,
)
from qless.errors import ConfigError, DataError

SYSTEM = "you are a small test"
MULTI_TURN = {
    "dataset": "tulu",
    "id": "conv-1",
    "subtask": "physics",
    "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "the answer is four"},
        {"role": "user", "content": "and 5?"},
        {"role": "assistant", "content": " maybe 9\n"},
    ],
}
RESPONSES = ["the answer is four", " maybe 9\n"]
PROMPT_SIDE = f"<|system|>\n{SYSTEM}\n<|user|>\nwhat is two plus two?\n<|assistant|>\n<|user|>\nand 5?\n<|assistant|>\n"

# A simple prefix-consistent chat template in the style of ChatML.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def qa(prompt: str, completion: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], **extra}


def split_by_label(item, tokenizer) -> tuple[str, str]:
    """(decoded labelled tokens, decoded unlabelled tokens) of a Tokenized item."""
    on = [t for t, label in zip(item.input_ids, item.labels) if label != IGNORE_INDEX]
    off = [t for t, label in zip(item.input_ids, item.labels) if label == IGNORE_INDEX]
    return tokenizer.decode(on), tokenizer.decode(off)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


# --------------------------------------------------------------------------- loading


def test_both_record_forms_sources_ids_and_subtask(tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", [MULTI_TURN, "", {"prompt": "2+2=", "completion": "4"}])
    a, b = load_examples(path)
    assert (a.source, a.id, a.subtask, a.origin) == ("tulu", "conv-1", "physics", f"{path}:1")
    assert a.messages[0] == ("system", SYSTEM) and a.messages[-1] == ("assistant", " maybe 9\n")
    assert a.record == MULTI_TURN
    assert (b.source, b.subtask, b.origin) == ("pool", None, f"{path}:3")
    assert b.messages == (("user", "2+2="), ("assistant", "4"))
    assert b.id.startswith("sha1:") and len(b.id) == len("sha1:") + 16
    assert b.record == {"prompt": "2+2=", "completion": "4"}
    # the caller's name replaces the file stem, never the record's own "dataset" field
    a2, b2 = load_examples(path, source="mine")
    assert (a2.source, b2.source) == ("tulu", "mine")


def test_hash_ids_are_stable_and_duplicates_get_distinct_ids(tmp_path, caplog):
    records = [qa("hi", "yo"), qa("hi", "yo"), qa("other", "yo"), qa("hi", "yo")]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with caplog.at_level(logging.INFO, logger="qless.data"):
        first = load_examples(path)
    ids = [e.id for e in first]
    assert ids[1] == ids[0] + "#2" and ids[3] == ids[0] + "#3" and ids[2] != ids[0]
    assert len(set(ids)) == 4
    assert "#2" in caplog.text
    # stable across runs and files: the hash depends on the messages only
    again = load_examples(write_jsonl(tmp_path / "e.jsonl", records[:1]))
    assert again[0].id == ids[0]
    assert load_examples(path) == first


def test_json_array_file(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([qa("a", "b"), qa("c", "d", id=7)], indent=2), encoding="utf-8")
    a, b = load_examples(path)
    assert (a.source, b.id) == ("arr", "7")
    assert a.origin == f"{path}:2" and b.origin.startswith(f"{path}:") and int(b.origin.rsplit(":", 1)[1]) > 2


def test_load_from_disk_round_trip(tmp_path):
    import datasets

    rows = [qa("hi", "yo", id="x", subtask="s1"), qa("hey", "ho", id="y", subtask="s2")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    examples = load_examples(tmp_path / "saved")
    assert [(e.source, e.id, e.subtask) for e in examples] == [("saved", "x", "s1"), ("saved", "y", "s2")]
    assert examples[1].messages == (("user", "hey"), ("assistant", "ho"))
    assert examples[1].origin == f"{tmp_path / 'saved'}#1"
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_examples(tmp_path / "dict", split="dev")) == 2
    with pytest.raises(DataError, match="no split 'train'.*dev"):
        load_examples(tmp_path / "dict")


def test_unreachable_hub_id_gives_data_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"^nobody/no-such-set: .*could not be loaded as a .*Hub dataset.*local .jsonl"):
        load_examples("nobody/no-such-set")


def test_missing_local_file_or_folder(tmp_path):
    for spec in (tmp_path / "absent.jsonl", "./absent", "a/b/c"):
        with pytest.raises(DataError, match="no such file"):
            load_examples(spec)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a folder written by datasets.save_to_disk"):
        load_examples(tmp_path / "plain")


# --------------------------------------------------------------------------- malformed input

BAD_RECORDS = {
    "invalid-json": ('{"messages": [', "invalid JSON"),
    "not-object": ("[1, 2]", "not an object"),
    "no-fields": ({"text": "hello"}, "neither 'messages' nor 'prompt'"),
    "no-completion": ({"prompt": "hello"}, "no 'completion'"),
    "no-role": ({"messages": [{"content": "x"}]}, r"messages\[0\] must be an object with 'role' and 'content'"),
    "no-content": ({"messages": [{"role": "user"}]}, r"messages\[0\] must be"),
    "unknown-role": ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]\.role is 'bot'"),
    "no-assistant": ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    "empty-response": (qa("x", "  \n"), r"messages\[1\] \(assistant\) has empty content"),
    "empty-completion": ({"prompt": "x", "completion": " "}, "'completion' is empty"),
    "non-string": (qa("x", 3), r"messages\[1\]\.content is a int"),
    "messages-not-list": ({"messages": "hi"}, "'messages' must be a non-empty list"),
    "object-id": (qa("x", "y", id={"n": 1}), "'id' must be a string or an integer, got dict"),
    "list-id": (qa("x", "y", id=[1]), "'id' must be a string or an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_malformed_record_names_file_line_and_field(tmp_path, case):
    record, message = BAD_RECORDS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [qa("fine", "ok"), record])
    with pytest.raises(DataError, match=message) as err:
        load_examples(path)
    assert str(err.value).startswith(f"{path}:2: ")


def test_duplicate_explicit_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [qa("a", "b", id="x"), qa("c", "d", id="y"), qa("e", "f", id="x")])
    with pytest.raises(DataError, match=rf"^{path}:3: id 'x' .* already used at {path}:1"):
        load_examples(path)
    # the same id in different sources is fine
    other = write_jsonl(tmp_path / "o.jsonl", [qa("a", "b", id="x", dataset="p"), qa("c", "d", id="x", dataset="q")])
    assert len(load_examples(other)) == 2


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{empty}: no records"):
        load_examples(empty)
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        load_examples(tmp_path / "empty.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n{"prompt": "a",\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad_json}:\d+: invalid JSON"):
        load_examples(bad_json)
    (tmp_path / "obj.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array"):
        load_examples(tmp_path / "obj.json")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=f"{binary}:1: not UTF-8"):
        load_examples(binary)
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(tmp_path / "data.csv")


def test_a_bad_byte_is_reported_at_its_own_line(tmp_path):
    lines = [json.dumps(qa(f"question {i} " + "x" * 60, "answer")) for i in range(200)]
    text = "\n".join(lines).encode()
    at = text.index(b"question 149 ")
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(text[:at] + b"\xff" + text[at + 1:])  # a stray byte in line 150, far past the first read buffer
    with pytest.raises(DataError, match=rf"^{path}:150: not UTF-8"):
        load_examples(path)
    assert len(load_examples(path, cfg=DataConfig(on_bad_record="skip"))) == 199


def test_skip_bad_records(tmp_path, caplog):
    lines = [qa("a", "b", id="1"), "{oops", qa("c", ""), qa("d", "e", id="1"), qa("f", "g")]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="qless.data"):
        examples = load_examples(path, cfg=DataConfig(on_bad_record="skip"))
    assert [e.origin for e in examples] == [f"{path}:1", f"{path}:5"]
    for line in (2, 3, 4):
        assert f"{path}:{line}" in caplog.text
    assert "skipped 3 of 5" in caplog.text
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", qa("c", "")])
    with pytest.raises(DataError, match="none of the 2 records is valid"):
        load_examples(only_bad, cfg=DataConfig(on_bad_record="skip"))


def test_config_validation():
    with pytest.raises(ConfigError, match="max_length"):
        DataConfig(max_length=0)
    with pytest.raises(ConfigError, match="template"):
        DataConfig(template="alpaca")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="on_bad_record"):
        DataConfig(on_bad_record="ignore")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- tokenization


def _example(record: dict) -> Example:
    return Example("t", "1", tuple((m["role"], m["content"]) for m in record["messages"]), None, record, "mem:1")


def test_less_labels_cover_exactly_the_responses(tiny_tokenizer):
    (item,), skipped = tokenize_examples([_example(MULTI_TURN)], tiny_tokenizer, DataConfig(), progress=False)
    assert not skipped and not item.truncated and len(item.input_ids) == len(item.labels)
    eos = tiny_tokenizer.eos_token
    on, off = split_by_label(item, tiny_tokenizer)
    assert on == "".join(r + eos + "\n" for r in RESPONSES)
    assert off == PROMPT_SIDE
    assert tiny_tokenizer.decode(item.input_ids) == (
        f"<|system|>\n{SYSTEM}\n<|user|>\nwhat is two plus two?\n<|assistant|>\nthe answer is four{eos}\n"
        f"<|user|>\nand 5?\n<|assistant|>\n maybe 9\n{eos}\n"
    )
    labelled = [i for i, label in enumerate(item.labels) if label != IGNORE_INDEX]
    assert all(item.labels[i] == item.input_ids[i] for i in labelled)


def test_tokenization_is_deterministic(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [MULTI_TURN, qa("hi", "yo"), {"prompt": "2+2=", "completion": "4"}])
    runs = [tokenize_examples(load_examples(path), tiny_tokenizer, DataConfig(), progress=False)[0] for _ in range(2)]
    first, second = ([(t.example.id, t.input_ids, t.labels) for t in run] for run in runs)
    assert first == second and len(first) == 3


def test_truncation_and_no_label_skip(tiny_tokenizer, caplog):
    short = _example(qa("hi", "the answer is four and more words here"))
    long_prompt = _example(qa("hello world " * 40, "yes"))
    full, _ = tokenize_examples([short], tiny_tokenizer, DataConfig(), progress=False)
    cut = next(i for i, label in enumerate(full[0].labels) if label != IGNORE_INDEX) + 3  # keeps 3 response tokens
    with caplog.at_level(logging.INFO, logger="qless.data"):
        done, skipped = tokenize_examples(
            [short, long_prompt], tiny_tokenizer, DataConfig(max_length=cut), progress=False
        )
    assert len(done) == 1 and done[0].truncated and not full[0].truncated
    assert done[0].input_ids == full[0].input_ids[:cut] and done[0].labels == full[0].labels[:cut]
    assert any(label != IGNORE_INDEX for label in done[0].labels)
    assert len(skipped) == 1 and skipped[0].example is long_prompt and f"max_length={cut}" in skipped[0].reason
    assert "skipping mem:1" in caplog.text and "skipped 1 of 2" in caplog.text


def test_left_truncation_keeps_the_response(tiny_tokenizer):
    long_prompt = _example(qa("hello world " * 40, "yes it is"))
    (full,), _ = tokenize_examples([long_prompt], tiny_tokenizer, DataConfig(), progress=False)
    done, skipped = tokenize_examples([long_prompt], tiny_tokenizer, DataConfig(max_length=20, truncation="left"),
                                      progress=False)
    assert not skipped and done[0].truncated and len(done[0].input_ids) == 20
    assert done[0].input_ids == full.input_ids[-20:] and done[0].labels == full.labels[-20:]
    with pytest.raises(ConfigError, match="truncation"):
        DataConfig(truncation="middle")


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="fast"):
        tokenize_examples([_example(MULTI_TURN)], Slow(), DataConfig(), progress=False)


def test_chat_template_labels_assistant_turns_only(chat_tokenizer):
    cfg = DataConfig(template="chat_template")
    (item,), _ = tokenize_examples([_example(MULTI_TURN)], chat_tokenizer, cfg, progress=False)
    eos = chat_tokenizer.eos_token
    on, off = split_by_label(item, chat_tokenizer)
    assert on == "".join(r + eos + "\n" for r in RESPONSES)
    assert off == PROMPT_SIDE
    # this template renders the same text as the LESS format, so the tokens agree too
    (less,), _ = tokenize_examples([_example(MULTI_TURN)], chat_tokenizer, DataConfig(), progress=False)
    assert (item.input_ids, item.labels) == (less.input_ids, less.labels)


def test_chat_template_with_default_system_prompt(chat_tokenizer):
    # ChatML-like, adding a system turn when the conversation has none (as SmolLM2's template does)
    chat_tokenizer.chat_template = (
        "{% if messages and messages[0]['role'] != 'system' %}{{ '<s>system\\nbe nice</s>\\n' }}{% endif %}"
        "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
    )
    example = _example(qa("hello", "world", id="1"))
    (item,), _ = tokenize_examples([example], chat_tokenizer, DataConfig(template="chat_template"), progress=False)
    on, off = split_by_label(item, chat_tokenizer)
    assert on == "world</s>\n"
    assert off == "<s>system\nbe nice</s>\n<s>user\nhello</s>\n<s>assistant\n"


def test_chat_template_errors(tiny_tokenizer, chat_tokenizer):
    cfg = DataConfig(template="chat_template")
    with pytest.raises(ConfigError, match="no chat template.*template='less'"):
        tokenize_examples([_example(MULTI_TURN)], tiny_tokenizer, cfg, progress=False)
    # a template that drops earlier assistant turns' content is not prefix-consistent
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
        "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
    )
    with pytest.raises(DataError, match="mem:1: .*not prefix-consistent.*template='less'"):
        tokenize_examples([_example(MULTI_TURN)], chat_tokenizer, cfg, progress=False)


def test_collate_pads_on_the_right(tiny_tokenizer):
    examples = [_example(qa("hi", "yo")), _example(MULTI_TURN)]
    items, _ = tokenize_examples(examples, tiny_tokenizer, DataConfig(), progress=False)
    pad = tiny_tokenizer.pad_token_id
    batch = collate(items, pad)
    lengths = [len(i.input_ids) for i in items]
    width = max(lengths)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (2, width) and t.dtype == torch.long for t in batch.values())
    n = lengths[0]
    assert batch["input_ids"][0, :n].tolist() == items[0].input_ids
    assert batch["input_ids"][0, n:].eq(pad).all() and batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["attention_mask"][1].eq(1).all() and batch["labels"][1].tolist() == items[1].labels
