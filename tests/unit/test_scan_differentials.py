"""Files that read one way to the stage and another way to a serving host's loader
(tests/corpus/differential_cases.py): each mechanism is shown on the stock reader first (torch's zip
reader, zipfile, transformers), then the stage refuses the file with the problem named."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from ckpt_stage.config import Settings
from ckpt_stage.domain import ReasonCode
from ckpt_stage.scan import scan_version
from tests.corpus import differential_cases as D

S = Settings()


def _scan(root: Path, *rels: str):
    return scan_version(root, list(rels), S)


def _blocking(result) -> list[tuple[ReasonCode, str]]:
    return [(f.code, f.message) for f in result.findings if f.blocking]


# -- zip: end-of-central-directory record -------------------------------------------------------------


def test_torch_and_zipfile_read_the_archive_in_the_comment(tmp_path):
    """The mechanism: both take the last end-of-central-directory signature, so the payload's data.pkl
    is the one they read (nothing is unpickled here)."""
    path = D.eocd_in_comment(tmp_path / "m.pt", tmp_path / "canary")
    reader = torch._C.PyTorchFileReader(str(path))
    assert b"system" in bytes(reader.get_record("data.pkl"))
    assert b"system" in zipfile.ZipFile(path).read(zipfile.ZipFile(path).namelist()[0])


def test_scanner_refuses_a_second_end_record_in_the_comment(tmp_path):
    D.eocd_in_comment(tmp_path / "m.pt", tmp_path / "canary")
    got = _blocking(_scan(tmp_path, "m.pt"))
    assert got and got[0][0] is ReasonCode.CORRUPT_ARCHIVE, got
    assert "second end-of-central-directory signature" in got[0][1]
    assert not (tmp_path / "canary").exists()


def _with_comment(data: bytes, comment: bytes) -> bytes:
    eocd = data.rfind(b"PK\x05\x06")
    return data[:eocd + 20] + struct.pack("<H", len(comment)) + comment


@pytest.mark.parametrize("comment, refused", [
    (b"trained on 2026-12-01", False),  # a plain comment is one reading for everyone
    (b"PK\x05\x06", True),  # too short for miniz (it takes the real record), zipfile takes it and fails
    (b"x" * 30 + b"PK\x05\x06" + b"\x00" * 18, True),  # a zero-entry end record ending the file: every reader
])                                                      # takes it, and its reading is refused
def test_end_record_siblings(tmp_path, comment, refused):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    (tmp_path / "m.pt").write_bytes(_with_comment(buf.getvalue(), comment))
    got = _blocking(_scan(tmp_path, "m.pt"))
    assert bool(got) is refused, got


# -- zip: record names torch matches ignoring case ------------------------------------------------


def test_torch_finds_records_ignoring_case(tmp_path):
    path = D.record_in_other_case(tmp_path / "m.pt")
    assert set(torch.load(path, weights_only=True)) == {"weight", "bias"}


def test_scanner_refuses_a_torch_record_in_another_case(tmp_path):
    D.record_in_other_case(tmp_path / "m.pt")
    got = _blocking(_scan(tmp_path, "m.pt"))
    assert any(c is ReasonCode.CORRUPT_ARCHIVE and "'archive/Data.Pkl' is the record 'archive/data.pkl'" in m
               for c, m in got), got


def test_scanner_refuses_two_names_that_differ_in_case(tmp_path):
    D.two_records_one_name(tmp_path / "m.pt", tmp_path / "canary")
    got = _blocking(_scan(tmp_path, "m.pt"))
    assert any(c is ReasonCode.CORRUPT_ARCHIVE and "differ only in letter case" in m for c, m in got), got


def test_case_rules_leave_other_names_alone(tmp_path):
    """Upper-case letters elsewhere (a TorchScript class path, a storage key) are not a second reading."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("weights/Readme.MD", "x")
        z.writestr("weights/readme.txt", "y")
    (tmp_path / "w.zip").write_bytes(buf.getvalue())
    assert not [f for f in _scan(tmp_path, "w.zip").findings if f.code is ReasonCode.CORRUPT_ARCHIVE]


# -- zip: storage offsets torch computes instead of reading them ---------------------------------


def test_mmap_with_computed_offsets_reads_other_bytes(tmp_path):
    path = D.storages_out_of_order(tmp_path / "m.pt")
    assert float(torch.load(path, weights_only=True, mmap=True)["b"][0]) == 2.0
    config = torch.utils.serialization.config.load
    before = config.calculate_storage_offsets
    config.calculate_storage_offsets = True
    try:
        assert float(torch.load(path, weights_only=True, mmap=True)["b"][0]) == 3.0
    finally:
        config.calculate_storage_offsets = before


def test_scanner_refuses_storages_where_torch_would_not_compute_them(tmp_path):
    D.storages_out_of_order(tmp_path / "m.pt")
    got = _blocking(_scan(tmp_path, "m.pt"))
    assert any(c is ReasonCode.CORRUPT_ARCHIVE and "calculate_storage_offsets" in m and "data/1" in m
               for c, m in got), got


def test_offset_formula_is_torchs(tmp_path):
    from ckpt_stage.scan.formats import no_read_offset

    path = D.storages_out_of_order(tmp_path / "m.pt")
    reader = torch._C.PyTorchFileReader(str(path))
    name_len = len(f"{path.stem}/data/1")
    for cursor in (0, 1, 63, 64, 1000, 2**32 - 40, 2**32 + 3, 2**41 + 7):
        for size in (0, 16, 2**32 - 1, 2**32, 2**40):
            for alignment in (1, 3, 64, 4096):
                assert no_read_offset(cursor, name_len, size, alignment) == \
                    reader.get_record_offset_no_read(cursor, "data/1", size, alignment)


def _shared_views():
    base = torch.arange(24, dtype=torch.float32)
    return {"whole": base, "view": base[4:12].view(2, 4), "again": base}


@pytest.mark.parametrize("obj", [
    lambda: torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)).state_dict(),
    _shared_views,
    lambda: {"empty": torch.empty(0), "one": torch.ones(1), "half": torch.ones(3, dtype=torch.float16),
             "ints": torch.arange(5), "bool": torch.tensor([True, False]), "nested": {"x": torch.zeros(2, 2)}},
    lambda: {f"t{i}": torch.full((i + 1,), float(i)) for i in range(40)},
    lambda: torch.nn.Linear(4, 2),
], ids=["sequential", "shared-views", "dtypes-empty-nested", "forty", "whole-module"])
def test_torch_save_layouts_pass_the_offset_rule(tmp_path, obj):
    torch.save(obj(), tmp_path / "m.pt")
    findings = [f for f in _scan(tmp_path, "m.pt").findings if f.detail.get("kind") == "computed-offsets"]
    assert not findings, [f.message for f in findings]


# -- a legacy torch file that is also a tar ------------------------------------------------------------


def test_torch_load_reads_a_legacy_file_as_tar_first(tmp_path):
    """The mechanism: the five legacy streams are fine, yet torch.load(weights_only=False) opens the tar and
    unpickles its ``storages`` member (run in a subprocess; the payload only creates the canary)."""
    import subprocess
    import sys

    canary = tmp_path / "canary"
    canary.mkdir()
    path = D.legacy_torch_tar(tmp_path / "model.pth", canary)
    code = f"import torch\ntry:\n    torch.load({str(path)!r}, weights_only=False)\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=tmp_path)
    assert (canary / "tar").exists()


def test_scanner_refuses_a_legacy_file_that_is_also_a_tar(tmp_path):
    canary = tmp_path / "canary"
    D.legacy_torch_tar(tmp_path / "model.pth", canary)
    got = _blocking(_scan(tmp_path, "model.pth"))
    assert any(c is ReasonCode.CORRUPT_ARCHIVE and "valid tar header" in m for c, m in got), got
    assert not canary.exists()


def test_real_legacy_files_are_not_tar_headers(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "a.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "b.txt").write_text("0000644 " * 64)
    result = _scan(tmp_path, "a.pt", "b.txt")
    assert not [f for f in result.findings if f.detail.get("content") == "tar-polyglot"]


# -- a name that picks the reader --------------------------------------------------------------------


def test_torch_load_picks_its_reader_by_the_safetensors_suffix(tmp_path):
    """torch 2.13's torch.load hands a path ending in .safetensors to the safetensors reader, whatever it
    holds; the same bytes under another name are read by content."""
    torch.save({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(Exception, match="header"):
        torch.load(tmp_path / "model.safetensors", weights_only=True)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.pt"))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "model.pt", weights_only=True)


@pytest.mark.parametrize("name, writer", [
    ("model.safetensors", lambda p: torch.save({"w": torch.ones(2)}, p)),
    ("model.safetensors", lambda p: torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False)),
    ("pytorch_model.bin", lambda p: __import__("safetensors.torch").torch.save_file({"w": torch.ones(2)}, str(p))),
    ("model.pt", lambda p: __import__("safetensors.torch").torch.save_file({"w": torch.ones(2)}, str(p))),
], ids=["zip-named-safetensors", "legacy-named-safetensors", "safetensors-named-bin", "safetensors-named-pt"])
def test_scanner_refuses_a_name_that_contradicts_the_content(tmp_path, name, writer):
    writer(tmp_path / name)
    got = _blocking(_scan(tmp_path, name))
    assert any(c is ReasonCode.CORRUPT_ARCHIVE and ".safetensors" in m for c, m in got), got


# -- Hugging Face folders --------------------------------------------------------------------------


def _run_folder(d: Path):
    pytest.importorskip("transformers")
    from tests.unit.test_hf_folder import run

    return run(d)


@pytest.mark.parametrize("build", [D.single_beside_shards, D.variant_beside_main, D.bin_beside_safetensors,
                                   lambda d: D.bin_beside_safetensors(d, shape=True)],
                         ids=["single-beside-shards", "variant", "bin-values", "bin-shape"])
def test_every_copy_of_the_weights_is_the_one_validated(tmp_path, build):
    d = build(tmp_path)
    decision, findings, _ = _run_folder(d)
    got = [f for f in findings if f.blocking]
    assert decision.verdict.value == "quarantine", [f.to_dict() for f in findings]
    assert any(f.code is ReasonCode.CORRUPT_ARCHIVE and f.detail.get("kind") == "copies-differ"
               and "transformer.h.0.ln_1.weight" in f.message for f in got), [f.to_dict() for f in got]


def test_transformers_serves_the_single_file_over_the_shards(tmp_path):
    """The mechanism for the first case: from_pretrained loads model.safetensors, not the index's shards."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    d = D.single_beside_shards(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert float(model.transformer.h[0].ln_1.weight[0].detach()) == 7.0


def test_identical_copies_and_a_rounded_variant_pass(tmp_path):
    d = D.benign_copies(tmp_path)
    assert {"model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"} <= {p.name for p in d.iterdir()}
    decision, findings, _ = _run_folder(d)
    assert decision.verdict.value == "pass", [f.to_dict() for f in findings if f.blocking]


@pytest.mark.parametrize("alone", [False, True], ids=["beside-model", "adapter-only"])
def test_peft_adapter_is_refused_by_the_scan(tmp_path, alone):
    pytest.importorskip("transformers")
    d = D.peft_adapter(tmp_path, alone=alone)
    rels = sorted(str(p.relative_to(d)) for p in d.iterdir())
    got = _blocking(scan_version(d, rels, S))
    assert any(c is ReasonCode.UNSUPPORTED_FORMAT and "attacker/unvetted-base" in m for c, m in got), got


def test_transformers_loads_the_file_a_config_names(tmp_path):
    """The mechanism: ``transformers_weights`` wins over model.safetensors."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(D.explicit_weights_file(tmp_path))
    assert float(model.transformer.h[0].ln_1.weight[0].detach()) == 7.0


def test_scan_refuses_a_config_that_names_its_weights_file(tmp_path):
    pytest.importorskip("transformers")
    d = D.explicit_weights_file(tmp_path)
    got = _blocking(scan_version(d, sorted(p.name for p in d.iterdir()), S))
    assert any(c is ReasonCode.CORRUPT_ARCHIVE and "transformers_weights" in m and "zz-finetuned" in m
               for c, m in got), got


def test_pickle_payload_fixture_really_calls_os_system():
    """The corpus payload is what it claims (checked without running it)."""
    data = pickle.dumps(D._System("true"), protocol=2)
    assert b"system" in data
