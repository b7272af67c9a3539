"""``scan_version`` as the pipeline calls it: whole MLflow model directories, loose files, formats,
the memory estimate and the RESOURCE_LIMIT check."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ckpt_stage.config import Settings, WorkerClass
from ckpt_stage.domain import FileFormat, ReasonCode
from ckpt_stage.scan import scan_version
from ckpt_stage.scan.estimate import OVERHEAD_BYTES
from tests.corpus.static_cases import Reduce, craft_zip, os_system_pickle, torch_layout, Z

S = Settings()


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def codes(result) -> set[str]:
    return {f.code.value for f in result.findings if f.code}


@pytest.fixture(scope="module")
def mlflow_pickle_dir(tmp_path_factory) -> Path:
    import mlflow.pytorch
    import numpy as np
    import torch

    d = tmp_path_factory.mktemp("mlf") / "model"
    mlflow.pytorch.save_model(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()), str(d),
                              serialization_format="pickle", input_example=np.zeros((1, 4), dtype="float32"),
                              pip_requirements=["torch"])
    return d


@pytest.fixture(scope="module")
def pt2_src(tmp_path_factory) -> Path:
    import torch

    src = tmp_path_factory.mktemp("pt2") / "src.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),)), str(src))
    return src


def test_mlflow_pickle_dir(mlflow_pickle_dir):
    rels = files(mlflow_pickle_dir)
    result = scan_version(mlflow_pickle_dir, rels, S)
    assert result.findings == ()
    assert result.formats["MLmodel"] is FileFormat.MLFLOW_MODEL
    assert result.formats["data/model.pth"] is FileFormat.TORCH_ZIP
    others = {p: f for p, f in result.formats.items() if p not in ("MLmodel", "data/model.pth")}
    assert set(others.values()) == {FileFormat.UNKNOWN}
    assert {"conda.yaml", "requirements.txt", "input_example.json", "data/pickle_module_info.txt"} <= set(others)
    assert result.estimated_bytes == (4 * 2 + 2) * 4 + OVERHEAD_BYTES


def test_pickled_models_can_be_turned_off(mlflow_pickle_dir):
    result = scan_version(mlflow_pickle_dir, files(mlflow_pickle_dir), Settings(allow_pickled_models=False))
    assert codes(result) == {"UNSAFE_PICKLE"}
    assert "CKPT_STAGE_ALLOW_PICKLED_MODELS" in result.findings[0].hint
    assert "torch.nn.modules.container.Sequential" in result.findings[0].message


def test_side_files_in_mlflow_dir_are_not_flagged(mlflow_pickle_dir, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(mlflow_pickle_dir, d)
    (d / "artifacts").mkdir()
    (d / "artifacts" / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    (d / "registered_model_meta").write_text("model_name: x\n")
    result = scan_version(d, files(d), S)
    assert result.findings == ()


def test_side_file_holding_a_pickle_is_scanned(mlflow_pickle_dir, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(mlflow_pickle_dir, d)
    (d / "input_example.json").write_bytes(os_system_pickle("touch /tmp/x"))
    result = scan_version(d, files(d), S)
    assert codes(result) == {"UNSAFE_PICKLE"}
    assert result.findings[0].file == "input_example.json"
    assert result.formats["input_example.json"] is FileFormat.PICKLE


def test_metadata_only_version(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "conda.yaml").write_text("channels:\n- conda-forge\n")
    result = scan_version(tmp_path, ["MLmodel", "conda.yaml"], S)
    assert [f.code for f in result.findings] == [ReasonCode.NOT_A_CHECKPOINT]
    assert result.findings[0].file is None and result.estimated_bytes == 0


def test_missing_file(tmp_path):
    result = scan_version(tmp_path, ["data/model.pt"], S)
    assert codes(result) == {"ARTIFACT_MISSING"}


def test_fifo_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "model.pt")
    assert codes(scan_version(tmp_path, ["model.pt"], S)) == {"NOT_A_CHECKPOINT"}


def _sd_bytes() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(256, 256)}, buf)
    return buf.getvalue()


def test_estimate_and_resource_limit(tmp_path):
    (tmp_path / "model.pt").write_bytes(_sd_bytes())
    result = scan_version(tmp_path, ["model.pt"], S)
    assert result.findings == () and result.estimated_bytes == 256 * 256 * 4 + OVERHEAD_BYTES
    small = Settings(worker_classes=(WorkerClass("small", 10 * 2**20),))
    result = scan_version(tmp_path, ["model.pt"], small)
    assert codes(result) == {"RESOURCE_LIMIT"}
    f = result.findings[0]
    assert "64.2 MiB" in f.message and "10.0 MiB" in f.message and "'small'" in f.message
    assert "CKPT_STAGE_WORKER_CLASSES" in f.hint and "quantize" in f.hint
    assert f.detail["estimated_bytes"] == result.estimated_bytes


def test_estimate_uses_safetensors_header_not_file_size(tmp_path):
    header = json.dumps({"w": {"dtype": "BF16", "shape": [1024], "data_offsets": [0, 2048]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 2048)
    assert scan_version(tmp_path, ["m.safetensors"], S).estimated_bytes == 2048 + OVERHEAD_BYTES


def test_many_shards_sum(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [256], "data_offsets": [0, 1024]}}).encode()
    rels = []
    for i in range(3):
        (tmp_path / f"model-{i}.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 1024)
        rels.append(f"model-{i}.safetensors")
    assert scan_version(tmp_path, rels, S).estimated_bytes == 3 * 1024 + OVERHEAD_BYTES


def test_torchscript(tmp_path):
    import torch

    torch.jit.script(torch.nn.Linear(4, 2)).save(str(tmp_path / "ts.pt"))
    result = scan_version(tmp_path, ["ts.pt"], S)
    assert result.findings == () and result.formats["ts.pt"] is FileFormat.TORCHSCRIPT


def test_pt2_with_native_code(tmp_path):
    import torch

    src = tmp_path / "src.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),)), str(src))
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "m.pt2", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
        zout.writestr("src/data/aotinductor/model/model.so", b"\x7fELF\x02\x01\x01" + b"\x00" * 100)
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert codes(result) == {"UNSUPPORTED_FORMAT"} and "native code" in result.findings[0].message
    assert result.formats["m.pt2"] is FileFormat.TORCH_EXPORT


def test_pt2_pickled_weight_is_scanned(tmp_path):
    import torch

    src = tmp_path / "src.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),)), str(src))
    buf = io.BytesIO()
    torch.save({"x": Reduce(os.system, ("true",))}, buf)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "m.pt2", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                meta = cfg["config"]["weight"]
                meta["use_pickle"] = True
                data = json.dumps(cfg).encode()
            if info.filename.endswith("weights/" + json.loads(zin.read("src/data/weights/model_weights_config.json"))[
                    "config"]["weight"]["path_name"]):
                data = buf.getvalue()
            zout.writestr(info.filename, data)
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert codes(result) == {"UNSAFE_PICKLE"} and "posix.system" in result.findings[0].message


def test_generic_zip_with_hidden_pickle(tmp_path):
    (tmp_path / "bundle.zip").write_bytes(craft_zip([Z("stuff/payload.bin", os_system_pickle("true"))]))
    result = scan_version(tmp_path, ["bundle.zip"], S)
    assert "UNSAFE_PICKLE" in codes(result)


def test_storage_declared_twice_differently(tmp_path):
    from tests.corpus.static_cases import _FakeStorage, _FakeTensor, lying_pkl

    a, b = _FakeStorage("0", 8), _FakeStorage("0", 4, "DoubleStorage")
    pkl = lying_pkl({"a": _FakeTensor(a, (8,), (1,)), "b": _FakeTensor(b, (4,), (1,))})
    (tmp_path / "m.pt").write_bytes(craft_zip(torch_layout(pkl, {"0": b"\x00" * 32})))
    result = scan_version(tmp_path, ["m.pt"], S)
    assert codes(result) == {"CORRUPT_ARCHIVE"} and "declared twice" in result.findings[0].message


def test_entry_outside_archive_folder(tmp_path):
    from tests.corpus.static_cases import benign_pkl

    pkl, storages = benign_pkl()
    entries = torch_layout(pkl, storages) + [Z("other/data.pkl", os_system_pickle("true"))]
    (tmp_path / "m.pt").write_bytes(craft_zip(entries))
    result = scan_version(tmp_path, ["m.pt"], S)
    assert codes(result) == {"CORRUPT_ARCHIVE", "UNSAFE_PICKLE"}
    assert any("outside the archive folder" in f.message for f in result.findings)


def test_scanner_never_imports_torch(tmp_path):
    (tmp_path / "model.pt").write_bytes(_sd_bytes())
    code = (
        "import sys; from pathlib import Path; from ckpt_stage.scan import scan_version; "
        "from ckpt_stage.config import Settings; "
        f"r = scan_version(Path({str(tmp_path)!r}), ['model.pt'], Settings()); "
        "assert r.findings == (), r.findings; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


def _variants(tmp_path: Path) -> dict[str, bytes]:
    import torch
    from safetensors.torch import save_file

    sd = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}
    out = {}
    buf = io.BytesIO()
    torch.save(sd, buf)
    out["zip.pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=False)
    out["legacy.pt"] = buf.getvalue()
    save_file(sd, str(tmp_path / "x.safetensors"))
    out["st.safetensors"] = (tmp_path / "x.safetensors").read_bytes()
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),)), str(tmp_path / "x.pt2"))
    out["m.pt2"] = (tmp_path / "x.pt2").read_bytes()
    return out


def test_fuzzed_files_never_crash_the_scanner(tmp_path):
    """Random byte flips, truncations and splices of real checkpoints: every outcome must be a
    model finding or a pass, never a scanner exception (INTERNAL_ERROR) or a hang."""
    import random

    rng = random.Random(20240611)
    for name, data in _variants(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        assert scan_version(tmp_path, [name], S).findings == ()
        for i in range(60):
            b = bytearray(data)
            op = i % 3
            if op == 0:
                for _ in range(rng.randint(1, 8)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            elif op == 1:
                del b[rng.randrange(len(b)):]
            else:
                at = rng.randrange(len(b))
                b[at:at] = os.urandom(rng.randint(1, 64))
            (tmp_path / name).write_bytes(bytes(b))
            result = scan_version(tmp_path, [name], S)
            assert "INTERNAL_ERROR" not in codes(result), (name, i, [f.message for f in result.findings])


def test_forged_entry_list_does_not_multiply_work(tmp_path):
    import time

    big = os_system_pickle("true" + " " * (4 * 2**20))
    entries = [Z("a/data.pkl", big), Z("a/version", b"3\n")]
    crc = __import__("zlib").crc32(big)
    entries += [Z(f"a/copy{i}.pkl", big, cd_offset=0, in_local=False, crc=crc) for i in range(3000)]
    (tmp_path / "m.pt").write_bytes(craft_zip(entries))
    start = time.monotonic()
    result = scan_version(tmp_path, ["m.pt"], S)
    assert time.monotonic() - start < 5
    assert {"CORRUPT_ARCHIVE", "UNSAFE_PICKLE"} <= codes(result)
    assert len(result.findings) <= 30


def test_big_legacy_file_reads_only_its_pickles(tmp_path, monkeypatch):
    import torch

    from ckpt_stage.scan import formats

    monkeypatch.setattr(formats, "PICKLE_PREFIX", 4096)
    torch.save({"w": torch.zeros(64, 1024)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    result = scan_version(tmp_path, ["legacy.pt"], Settings(max_pickle_bytes=8192))
    assert result.findings == () and result.formats["legacy.pt"] is FileFormat.TORCH_LEGACY
    assert result.estimated_bytes == 64 * 1024 * 4 + OVERHEAD_BYTES
    # a plain pickle larger than the limit is refused as a resource limit, not parsed partially
    (tmp_path / "big.pkl").write_bytes(__import__("pickle").dumps(list(range(50_000)), protocol=2))
    assert codes(scan_version(tmp_path, ["big.pkl"], Settings(max_pickle_bytes=8192))) == {"RESOURCE_LIMIT"}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["tensor_meta"].update(dtype=[7]),
        lambda m: m["tensor_meta"].update(sizes=5),
        lambda m: m["tensor_meta"].update(strides={"as_int": 1}),
        lambda m: m["tensor_meta"].update(storage_offset="x"),
        lambda m: m.update(tensor_meta=None),
        lambda m: m.update(path_name="../../etc/passwd"),
        lambda m: m.update(path_name=7),
    ],
)
def test_pt2_config_garbage_is_corrupt_not_a_crash(tmp_path, mutate, pt2_src):
    src = pt2_src
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "m.pt2", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                mutate(cfg["config"]["weight"])
                data = json.dumps(cfg).encode()
            zout.writestr(info.filename, data)
    result = scan_version(tmp_path, ["m.pt2"], S)
    assert "INTERNAL_ERROR" not in codes(result)
