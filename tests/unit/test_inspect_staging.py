"""``inspect`` never changes the user's files: the worker reads a private staged copy."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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


# -- what inspect will not hand to the worker -------------------------------------------------------

import pytest  # noqa: E402

from ckpt_stage.errors import UsageError  # noqa: E402
from ckpt_stage.pipeline import _stage, collect_paths  # noqa: E402


def _model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    torch.save(torch.nn.Linear(4, 2).state_dict(), d / "model.pt")
    return d


def test_a_symlink_inside_the_folder_to_a_regular_file_is_staged_as_its_bytes(tmp_path):
    d = _model_dir(tmp_path)
    (d / "sub").mkdir()
    os.symlink("../model.pt", d / "sub" / "alias.pt")
    root, rels = collect_paths([d])
    assert rels == ["model.pt", "sub/alias.pt"]
    staging = tmp_path / "stage"
    _stage(root, rels, staging)
    assert not (staging / "sub" / "alias.pt").is_symlink()
    assert (staging / "sub" / "alias.pt").read_bytes() == (d / "model.pt").read_bytes()


@pytest.mark.parametrize("target", ["/proc/self/environ", "/etc/hostname", "outside", "/dev/zero", "/proc/self/fd/0"])
def test_a_symlink_out_of_the_folder_is_a_usage_error_naming_it(tmp_path, target, monkeypatch):
    monkeypatch.setenv("CKPT_STAGE_CANARY_SECRET", "canary-in-environ")
    d = _model_dir(tmp_path)
    if target == "outside":
        target = str(tmp_path / "secret.txt")
        (tmp_path / "secret.txt").write_text("world-readable but outside")
    os.symlink(target, d / "config.json")
    with pytest.raises(UsageError) as err:
        collect_paths([d])
    assert "config.json" in err.value.message and err.value.hint


def test_a_symlinked_directory_is_a_usage_error(tmp_path):
    d = _model_dir(tmp_path)
    os.symlink("/etc", d / "etc")
    with pytest.raises(UsageError, match="etc is a symlink to a directory"):
        collect_paths([d])


def test_an_explicit_link_to_proc_or_a_device_is_refused(tmp_path):
    link = tmp_path / "model.pt"
    os.symlink("/proc/self/environ", link)
    with pytest.raises(UsageError, match="not a checkpoint file"):
        collect_paths([link])
    with pytest.raises(UsageError, match="not a checkpoint file"):
        collect_paths([Path("/dev/null")])


def test_a_fifo_is_a_usage_error_and_never_blocks(tmp_path):
    d = _model_dir(tmp_path)
    os.mkfifo(d / "pipe.pt")
    with pytest.raises(UsageError, match="pipe.pt is not a regular file"):
        collect_paths([d])
    with pytest.raises(UsageError, match="not a regular file"):
        collect_paths([d / "pipe.pt"])


def test_a_file_the_invoking_user_cannot_read_is_refused(tmp_path):
    d = _model_dir(tmp_path)
    other = d / "other-users.pt"
    torch.save({"w": torch.zeros(1)}, other)
    os.chmod(other, 0o600)
    # Owned by someone else: a root stage could read it, the person who asked could not.
    os.chown(other, 12345, 12345) if os.geteuid() == 0 else pytest.skip("chown to another user needs root")
    with pytest.raises(UsageError, match="other-users.pt: you cannot read this file yourself"):
        collect_paths([d])
    with pytest.raises(UsageError, match="cannot read"):
        collect_paths([other])


def test_sudo_invoker_is_the_user_who_ran_sudo(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    d = _model_dir(tmp_path)
    os.chmod(d / "model.pt", 0o600)  # root's own file: fine for root, not for the sudo user
    os.chmod(tmp_path, 0o755)
    assert collect_paths([d])[1] == ["model.pt"]
    monkeypatch.setenv("SUDO_UID", "12345")
    monkeypatch.setenv("SUDO_GID", "12345")
    with pytest.raises(UsageError, match="cannot read"):
        collect_paths([d])


def test_a_sparse_file_stays_sparse_when_staged(tmp_path):
    d = tmp_path / "sparse"
    d.mkdir()
    big = d / "model.pt"
    with open(big, "wb") as fh:
        fh.write(b"PK\x03\x04start")
        fh.seek(8 * 2**30)  # 8 GiB apparent, a few KiB on disk
        fh.write(b"end")
    os.chmod(big, 0o600)  # not world-readable: staged by copy, not by hard link
    st = big.stat()
    assert st.st_blocks * 512 < 2**20, "this filesystem does not keep holes"
    root, rels = collect_paths([d])
    staging = tmp_path / "stage"
    _stage(root, rels, staging)
    copy = (staging / "model.pt").stat()
    assert copy.st_size == st.st_size and copy.st_blocks * 512 < 2**20
    with open(staging / "model.pt", "rb") as fh:
        assert fh.read(9) == b"PK\x03\x04start"
        fh.seek(8 * 2**30)
        assert fh.read() == b"end"


def test_inspect_cli_exit_status_for_a_link_out_is_usage(tmp_path):
    from click.testing import CliRunner

    from ckpt_stage.cli import main

    d = _model_dir(tmp_path)
    os.symlink("/proc/self/environ", d / "env.txt")
    res = CliRunner().invoke(main, ["inspect", str(d), "--json"])
    assert res.exit_code == 2, res.output
    assert "env.txt" in res.output
