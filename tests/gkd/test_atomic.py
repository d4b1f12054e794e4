from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gkd.atomic import atomic_write, atomic_write_json


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path) -> None:
    target = tmp_path / "config.json"
    atomic_write(target, lambda p: p.write_text("old"))

    def broken(p: Path) -> None:
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def test_atomic_write_json_round_trip(tmp_path) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    assert os.listdir(tmp_path) == ["a.json"]
