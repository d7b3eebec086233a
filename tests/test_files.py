"""Writing files (tokenopt.files): a failed write leaves nothing behind, an unwritable target fails early.

Reading checkpoints is tested through the loaders that use it, in test_sources.py.
"""
from __future__ import annotations

import os

import pytest

from tokenopt import files
from tokenopt.errors import TokenoptError


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with files.atomic_write(target) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    with files.atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_output_folder_must_exist(tmp_path):
    with pytest.raises(TokenoptError, match="output folder does not exist: .*missing"):
        files.check_output_path(tmp_path / "missing" / "out.pt")
    with pytest.raises(TokenoptError, match="is a directory"):
        files.check_output_path(tmp_path)
