"""``inspect`` never changes the user's files: the worker reads a private staged copy."""

from __future__ import annotations

import os
import stat

import torch

from ckpt_stage.config import Settings
from ckpt_stage.pipeline import inspect_paths


def test_inspect_leaves_private_files_and_their_folder_alone(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chmod(home, 0o700)
    secret = home / "notes.txt"
    secret.write_text("private")
    os.chmod(secret, 0o600)
    ckpt = home / "model.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), ckpt)
    os.chmod(ckpt, 0o600)
    before = {p: stat.S_IMODE(p.stat().st_mode) for p in (home, secret, ckpt)}

    report = inspect_paths([ckpt], arch="torch.nn:Linear", arch_kwargs={"in_features": 4, "out_features": 2},
                           settings=Settings(cache_dir=tmp_path / "cache"))

    assert report.verdict.value == "pass", report.to_dict()["reasons"]
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in (home, secret, ckpt)} == before
    assert [f.path for f in report.files] == ["model.pt"]
    assert not any((tmp_path / "cache" / "inspect").iterdir())  # staging removed
