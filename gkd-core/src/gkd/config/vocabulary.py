"""What a checkpoint directory says about its vocabulary, and how two vocabularies differ.

Validation compares every teacher's and student source's vocabulary with the run's tokenizer:
gkd feeds every model of a step the same token ids. Only files are read (``config.json`` and the
tokenizer files); nothing is imported from torch or the models.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Vocabulary:
    """What a checkpoint directory says about its vocabulary."""

    size: int | None
    """``vocab_size`` of ``config.json``."""
    tokens: dict[int, str] | None
    """id → token, from ``tokenizer.json`` (model vocabulary plus added tokens), else ``vocab.txt``,
    else ``vocab.json`` (plus ``added_tokens.json``)."""
    source: str | None
    """The file ``tokens`` (or, for a sentencepiece-only tokenizer, ``digest``) comes from."""
    digest: str | None
    """sha256 of the id → token table (of ``tokenizer.model`` when that is the only file)."""


def _read_tokens(file: Path) -> dict[int, str] | None:
    """The id → token table of one tokenizer file (None: a layout gkd does not read)."""
    text = file.read_text(encoding="utf-8")
    if file.name == "vocab.txt":
        lines = text.split("\n")
        return dict(enumerate(lines[:-1] if lines and lines[-1] == "" else lines))
    data = json.loads(text)
    if file.name == "vocab.json":
        tokens = {int(i): str(tok) for tok, i in data.items()}
        added = file.parent / "added_tokens.json"
        if added.is_file():
            tokens |= {int(i): str(tok) for tok, i in json.loads(added.read_text(encoding="utf-8")).items()}
        return tokens
    vocab = data.get("model", {}).get("vocab") if isinstance(data.get("model"), dict) else None
    if isinstance(vocab, dict):
        tokens = {int(i): str(tok) for tok, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        tokens = {i: str(entry[0]) for i, entry in enumerate(vocab)}
    else:
        return None
    for added in data.get("added_tokens") or []:
        tokens[int(added["id"])] = str(added["content"])
    return tokens


def read_vocabulary(path: Path) -> Vocabulary:
    """The vocabulary a checkpoint (or tokenizer) directory declares; unreadable parts are None."""
    try:
        size = json.loads((path / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        size = None
    size = size if isinstance(size, int) and not isinstance(size, bool) else None
    for name in ("tokenizer.json", "vocab.txt", "vocab.json"):
        if (path / name).is_file():
            try:
                tokens = _read_tokens(path / name)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
                tokens = None
            if tokens is not None:
                table = json.dumps(sorted(tokens.items()), ensure_ascii=False).encode()
                return Vocabulary(size, tokens, name, hashlib.sha256(table).hexdigest())
    model = path / "tokenizer.model"
    if model.is_file():
        return Vocabulary(size, None, model.name, hashlib.sha256(model.read_bytes()).hexdigest())
    return Vocabulary(size, None, None, None)


def vocabulary_problems(who: str, mine: Vocabulary, ref_label: str, ref: Vocabulary) -> list[str]:
    """One line per way ``mine`` differs from the run's vocabulary ``ref``."""
    why = "gkd feeds every model of a step the same token ids, so all need the run's tokenizer"
    problems = []
    if mine.size is not None and ref.size is not None and mine.size != ref.size:
        problems.append(f"{who} has vocab_size {mine.size} (config.json), the run's tokenizer ({ref_label}) "
                        f"{ref.size}; {why}")
    if mine.tokens is not None and ref.tokens is not None and mine.digest != ref.digest:
        ids = sorted(i for i in mine.tokens.keys() | ref.tokens.keys() if mine.tokens.get(i) != ref.tokens.get(i))

        def show(token: str | None) -> str:
            return repr(token) if token is not None else "no token"

        assert mine.digest is not None and ref.digest is not None
        problems.append(
            f"{who}'s tokenizer ({mine.source}, {len(mine.tokens)} tokens, sha256 {mine.digest[:12]}) differs from "
            f"the run's ({ref_label}: {ref.source}, {len(ref.tokens)} tokens, sha256 {ref.digest[:12]}) at "
            f"{len(ids)} ids, e.g. id {ids[0]} is {show(mine.tokens.get(ids[0]))} there and "
            f"{show(ref.tokens.get(ids[0]))} in the run's; {why}")
    elif mine.tokens is None and ref.tokens is None and mine.source == ref.source == "tokenizer.model" \
            and mine.digest != ref.digest:
        assert mine.digest is not None and ref.digest is not None
        problems.append(f"{who}'s tokenizer.model (sha256 {mine.digest[:12]}) differs from the run's ({ref_label}, "
                        f"sha256 {ref.digest[:12]}); {why}")
    return problems


__all__ = ["Vocabulary", "read_vocabulary", "vocabulary_problems"]
