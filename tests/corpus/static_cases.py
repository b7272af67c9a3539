"""Cases the static scanner (layer 1) must decide on its own: hostile pickles, scanner confusion,
archive tricks, lying tensor metadata, bad safetensors headers, non-checkpoints, and the benign
checkpoints that must pass end to end.

Every builder writes real files under ``workdir`` (nothing binary is committed). Hostile payloads
would create a file in ``canary`` (or connect to 127.0.0.1) if they ever ran. Pickles that
``pickle`` cannot produce are written opcode by opcode (see ``P`` below).
"""

from __future__ import annotations

import builtins
import functools
import gzip
import io
import json
import os
import pickle
import pkgutil
import runpy
import socket
import struct
import subprocess
import tarfile
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tests.corpus import Built, Case

UNSAFE = "UNSAFE_PICKLE"
CORRUPT = "CORRUPT_ARCHIVE"
UNSUPPORTED = "UNSUPPORTED_FORMAT"
NOT_CKPT = "NOT_A_CHECKPOINT"
RESOURCE = "RESOURCE_LIMIT"

LINEAR = "torch.nn:Linear"
LINEAR_KW = {"in_features": 4, "out_features": 2}


# -- helpers: torch objects, payloads, hand-written pickles, hand-written zips ---------------------


def _torch():
    import torch

    return torch


def _linear_sd() -> dict:
    torch = _torch()
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2).state_dict()


class Reduce:
    """Pickles as ``fn(*args)``: what a malicious ``__reduce__`` looks like on the wire."""

    def __init__(self, fn, args: tuple):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)

    def __call__(self, *args):  # pickle requires the callee to be callable; never called here
        raise RuntimeError("a payload placeholder")


def touch(canary: Path, name: str) -> str:
    return f"touch {canary / name}"


def save_torch(path: Path, obj, **kw) -> Path:
    _torch().save(obj, path, **kw)
    return path


class P:
    """Tiny opcode writer for pickles ``pickle`` refuses to produce."""

    @staticmethod
    def proto(n: int) -> bytes:
        return b"\x80" + bytes([n])

    @staticmethod
    def su(s: str) -> bytes:  # SHORT_BINUNICODE
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b

    @staticmethod
    def bu(s: str) -> bytes:  # BINUNICODE
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    @staticmethod
    def glob(module: str, name: str) -> bytes:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    @staticmethod
    def frame(body: bytes, declared: int | None = None) -> bytes:
        return b"\x95" + struct.pack("<Q", len(body) if declared is None else declared) + body

    MARK, TUPLE, TUPLE1, TUPLE2, REDUCE, STOP = b"(", b"t", b"\x85", b"\x86", b"R", b"."
    EMPTY_DICT, EMPTY_LIST, APPEND, SETITEM, BUILD, POP = b"}", b"]", b"a", b"s", b"b", b"0"
    MEMOIZE, STACK_GLOBAL, NONE, EMPTY_TUPLE = b"\x94", b"\x93", b"N", b")"

    @staticmethod
    def binput(i: int) -> bytes:
        return b"q" + bytes([i])

    @staticmethod
    def binget(i: int) -> bytes:
        return b"h" + bytes([i])


def os_system_pickle(cmd: str, proto: int = 2) -> bytes:
    return P.proto(proto) + P.glob("posix", "system") + P.bu(cmd) + P.TUPLE1 + P.REDUCE + P.STOP


@dataclass
class Z:
    """One entry for ``craft_zip``; the overrides forge what a hostile writer would."""

    name: str
    data: bytes
    method: int = 0
    flags: int = 0
    local_name: str | None = None
    crc: int | None = None
    usize: int | None = None
    payload: bytes | None = None
    """Bytes actually written (already compressed) when they differ from ``data``."""
    cd_offset: int | None = None
    in_cd: bool = True
    in_local: bool = True


def craft_zip(entries: list[Z]) -> bytes:
    """A zip written field by field (no zip64, no descriptors), so tests can lie in any field."""
    out = bytearray()
    cd = bytearray()
    count = 0
    for e in entries:
        payload = e.payload if e.payload is not None else e.data
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        usize = len(e.data) if e.usize is None else e.usize
        offset = len(out)
        if e.in_local:
            lname = (e.local_name if e.local_name is not None else e.name).encode()
            out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, e.flags, e.method, 0, 0x21, crc,
                               len(payload), usize, len(lname), 0) + lname + payload
        if e.in_cd:
            name = e.name.encode()
            cd += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, e.flags, e.method, 0, 0x21, crc,
                              len(payload), usize, len(name), 0, 0, 0, 0, 0,
                              offset if e.cd_offset is None else e.cd_offset) + name
            count += 1
    cd_off = len(out)
    out += cd
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(cd), cd_off, 0)
    return bytes(out)


def torch_layout(pkl: bytes, storages: dict[str, bytes] | None = None, prefix: str = "archive") -> list[Z]:
    """The records torch.save writes, minus alignment padding."""
    entries = [Z(f"{prefix}/data.pkl", pkl), Z(f"{prefix}/byteorder", b"little")]
    for key, data in (storages or {}).items():
        entries.append(Z(f"{prefix}/data/{key}", data))
    entries.append(Z(f"{prefix}/version", b"3\n"))
    return entries


def benign_pkl() -> tuple[bytes, dict[str, bytes]]:
    """data.pkl and storage records of the Linear(4, 2) state_dict, from a real torch.save."""
    buf = io.BytesIO()
    _torch().save(_linear_sd(), buf)
    zf = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    prefix = zf.namelist()[0].split("/")[0]
    storages = {n.split("/")[-1]: zf.read(n) for n in zf.namelist() if n.startswith(f"{prefix}/data/")}
    return zf.read(f"{prefix}/data.pkl"), storages


class _FakeStorage:
    def __init__(self, key: str, numel: int, stype: str = "FloatStorage"):
        self.key, self.numel, self.stype = key, numel, stype


class _FakeTensor:
    def __init__(self, storage: _FakeStorage, size: tuple, stride: tuple, offset: int = 0):
        self.storage, self.size, self.stride, self.offset = storage, size, stride, offset

    def __reduce__(self):
        torch = _torch()
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, self.offset, self.size, self.stride, False, OrderedDict()))


class _MetaPickler(pickle.Pickler):
    """torch.save's pickling, with tensor metadata we choose (to make it lie)."""

    def persistent_id(self, obj):
        if isinstance(obj, _FakeStorage):
            return ("storage", getattr(_torch(), obj.stype), obj.key, "cpu", obj.numel)
        return None


def lying_pkl(obj) -> bytes:
    buf = io.BytesIO()
    _MetaPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def one(path: Path, **kw) -> Built:
    return Built(paths=[path], **kw)


def torch_zip_bytes(obj) -> bytes:
    buf = io.BytesIO()
    _torch().save(obj, buf)
    return buf.getvalue()


def patch_zip(data: bytes, name: str, *, local_flags: int | None = None, cd_flags: int | None = None,
              local_name: bytes | None = None) -> bytes:
    """Rewrite header fields of entry ``name`` in a real (torch-written) zip."""
    b = bytearray(data)
    raw = name.encode()
    cd_at = b.find(b"PK\x01\x02" + b"", 0)
    while cd_at >= 0:
        nlen = struct.unpack_from("<H", b, cd_at + 28)[0]
        if bytes(b[cd_at + 46:cd_at + 46 + nlen]) == raw:
            lho = struct.unpack_from("<I", b, cd_at + 42)[0]
            if cd_flags is not None:
                struct.pack_into("<H", b, cd_at + 8, cd_flags)
            if local_flags is not None:
                struct.pack_into("<H", b, lho + 6, local_flags)
            if local_name is not None:
                assert len(local_name) == nlen
                b[lho + 30:lho + 30 + nlen] = local_name
            return bytes(b)
        cd_at = b.find(b"PK\x01\x02", cd_at + 4)
    raise KeyError(name)


def _st_file(path: Path, header: dict | bytes | str, data: bytes = b"", *, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    n = len(raw) if length is None else length
    return write(path, struct.pack("<Q", n) + raw + data)


def _f32(n: int) -> bytes:
    return b"\x00" * (4 * n)


# -- benign: must pass end to end ----------------------------------------------------------------


def b_state_dict(w: Path, c: Path) -> Built:
    return one(save_torch(w / "model.pt", _linear_sd()), arch=LINEAR, arch_kwargs=LINEAR_KW)


def b_nested_state_dict(w: Path, c: Path) -> Built:
    # torchvision-style dotted keys several modules deep (self_attn.out_proj.weight, norm1.bias...).
    torch = _torch()
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    return one(save_torch(w / "encoder.pth", layer.state_dict()), arch="torch.nn:TransformerEncoderLayer",
               arch_kwargs={"d_model": 8, "nhead": 2, "dim_feedforward": 16})


def b_safetensors(w: Path, c: Path) -> Built:
    from safetensors.torch import save_file

    path = w / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _linear_sd().items()}, str(path), metadata={"format": "pt"})
    return one(path, arch=LINEAR, arch_kwargs=LINEAR_KW)


def b_legacy(w: Path, c: Path) -> Built:
    path = save_torch(w / "legacy.pt", _linear_sd(), _use_new_zipfile_serialization=False)
    return one(path, arch=LINEAR, arch_kwargs=LINEAR_KW)


def b_mlflow_pickle(w: Path, c: Path) -> Built:
    import mlflow.pytorch
    import numpy as np

    torch = _torch()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    mlflow.pytorch.save_model(model, str(w / "model"), serialization_format="pickle",
                              input_example=np.zeros((2, 4), dtype="float32"), pip_requirements=["torch"])
    return Built(paths=[w / "model"])


def b_mlflow_pt2(w: Path, c: Path) -> Built:
    import mlflow.pytorch
    import numpy as np

    torch = _torch()
    torch.manual_seed(0)
    mlflow.pytorch.save_model(torch.nn.Sequential(torch.nn.Linear(4, 2)), str(w / "model"),
                              input_example=np.zeros((2, 4), dtype="float32"), pip_requirements=["torch"])
    return Built(paths=[w / "model"])


# -- hostile: code execution through pickle -------------------------------------------------------


def _evil_torch_save(w: Path, name: str, payload) -> Built:
    """A real torch.save archive whose state dict also carries ``payload``."""
    sd = dict(_linear_sd())
    sd["_extra"] = payload
    return one(save_torch(w / name, sd), arch=LINEAR, arch_kwargs=LINEAR_KW)


def h_os_system(w: Path, c: Path) -> Built:
    return _evil_torch_save(w, "model.pt", Reduce(os.system, (touch(c, "os_system"),)))


def h_subprocess(w: Path, c: Path) -> Built:
    return _evil_torch_save(w, "model.pt", Reduce(subprocess.Popen, (["touch", str(c / "popen")],)))


def h_eval(w: Path, c: Path) -> Built:
    return _evil_torch_save(w, "model.pt", Reduce(builtins.eval, (f"__import__('os').system('{touch(c, 'eval')}')",)))


def h_exec(w: Path, c: Path) -> Built:
    return _evil_torch_save(w, "model.pt", Reduce(builtins.exec, (f"import os; os.system('{touch(c, 'exec')}')",)))


def h_getattr_import(w: Path, c: Path) -> Built:
    # getattr(__import__("os"), "system")("touch ...")
    body = (P.glob("builtins", "getattr") + P.MARK + P.glob("builtins", "__import__") + P.bu("os") + P.TUPLE1
            + P.REDUCE + P.bu("system") + P.TUPLE + P.REDUCE + P.bu(touch(c, "getattr")) + P.TUPLE1 + P.REDUCE)
    return one(write(w / "model.pt", P.proto(2) + body + P.STOP))


def h_importlib(w: Path, c: Path) -> Built:
    body = (P.glob("builtins", "getattr") + P.MARK + P.glob("importlib", "import_module") + P.bu("os")
            + P.TUPLE1 + P.REDUCE + P.bu("system") + P.TUPLE + P.REDUCE + P.bu(touch(c, "importlib"))
            + P.TUPLE1 + P.REDUCE)
    return one(write(w / "model.pt", P.proto(2) + body + P.STOP))


def h_pkgutil(w: Path, c: Path) -> Built:
    return _evil_torch_save(w, "model.pt", Reduce(Reduce(pkgutil.resolve_name, ("os:system",)), (touch(c, "pkgutil"),)))


def h_runpy(w: Path, c: Path) -> Built:
    script = write(w / "payload.py", f"import os\nos.system({touch(c, 'runpy')!r})\n".encode())
    return _evil_torch_save(w, "model.pt", Reduce(runpy.run_path, (str(script),)))


def h_pip_main(w: Path, c: Path) -> Built:
    import pip

    return _evil_torch_save(w, "model.pt", Reduce(pip.main, (["download", "-d", str(c / "pip"), "six"],)))


def h_inductor(w: Path, c: Path) -> Built:
    import torch._inductor.codecache as cc

    return _evil_torch_save(w, "model.pt", Reduce(cc.write_atomic, (str(c / "inductor"), "pwned")))


def h_jit(w: Path, c: Path) -> Built:
    from torch.jit import unsupported_tensor_ops as uto

    code = f"import os; os.system({touch(c, 'jit')!r})"
    return _evil_torch_save(w, "model.pt", Reduce(uto.execWrapper, (code, {}, {})))


def h_partial_torch_load(w: Path, c: Path) -> Built:
    torch = _torch()
    inner = write(w / "inner.pt", os_system_pickle(touch(c, "partial")))
    loader = functools.partial(torch.load, weights_only=False)
    return _evil_torch_save(w, "model.pt", Reduce(loader, (str(inner),)))


def h_socket(w: Path, c: Path) -> Built:
    return _evil_torch_save(w, "model.pt", Reduce(socket.create_connection, (("127.0.0.1", 9),)))


# -- hostile: scanner confusion ------------------------------------------------------------------


def h_benign_then_evil(w: Path, c: Path) -> Built:
    data = pickle.dumps({"weights": [1.0, 2.0]}, protocol=2) + os_system_pickle(touch(c, "second_stream"))
    return one(write(w / "model.pt", data))


def h_legacy_tail(w: Path, c: Path) -> Built:
    path = save_torch(w / "legacy.pt", _linear_sd(), _use_new_zipfile_serialization=False)
    with path.open("ab") as fh:
        fh.write(os_system_pickle(touch(c, "legacy_tail")))
    return one(path, arch=LINEAR, arch_kwargs=LINEAR_KW)


def h_memo_stack_global(w: Path, c: Path) -> Built:
    # "os" and "system" are memoized, popped, and fetched back for STACK_GLOBAL: a scanner that
    # only looks at the two opcodes before STACK_GLOBAL sees BINGETs, not names.
    body = (P.su("os") + P.MEMOIZE + P.POP + P.su("system") + P.MEMOIZE + P.POP
            + P.binget(0) + P.binget(1) + P.STACK_GLOBAL + P.su(touch(c, "memo")) + P.TUPLE1 + P.REDUCE)
    return one(write(w / "model.pt", P.proto(4) + P.frame(body + P.STOP)))


def h_memo_overwrite(w: Path, c: Path) -> Built:
    body = (P.su("collections") + P.binput(0) + P.POP + P.su("OrderedDict") + P.binput(1) + P.POP
            + P.su("os") + P.binput(0) + P.POP + P.su("system") + P.binput(1) + P.POP
            + P.binget(0) + P.binget(1) + P.STACK_GLOBAL + P.su(touch(c, "overwrite")) + P.TUPLE1 + P.REDUCE)
    return one(write(w / "model.pt", P.proto(4) + body + P.STOP))


def h_memo_unset(w: Path, c: Path) -> Built:
    body = P.EMPTY_DICT + P.su("weight") + P.binget(42) + P.SETITEM
    return one(write(w / "model.pt", P.proto(4) + body + P.STOP))


def h_stack_global_strings(w: Path, c: Path) -> Built:
    # STACK_GLOBAL fed by protocol-0 STRING opcodes instead of unicode constants.
    body = b"S'os'\n" + b"S'system'\n" + P.STACK_GLOBAL + P.su(touch(c, "strings")) + P.TUPLE1 + P.REDUCE
    return one(write(w / "model.pt", P.proto(4) + body + P.STOP))


def h_frame_lie(w: Path, c: Path) -> Built:
    body = P.EMPTY_DICT + P.su("weight") + P.NONE + P.SETITEM + P.STOP
    return one(write(w / "model.pt", P.proto(4) + P.frame(body, declared=2**40)))


def h_payload_then_broken(w: Path, c: Path) -> Built:
    data = P.proto(2) + P.glob("posix", "system") + P.bu(touch(c, "broken")) + P.TUPLE1 + P.REDUCE + b"\xff\xfe garbage"
    return one(write(w / "model.pt", data))


def h_pickle_as_json(w: Path, c: Path) -> Built:
    from safetensors.torch import save_file

    st = w / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _linear_sd().items()}, str(st))
    cfg = write(w / "config.json", os_system_pickle(touch(c, "json")))
    return Built(paths=[st, cfg], arch=LINEAR, arch_kwargs=LINEAR_KW)


def h_pickle_as_bin(w: Path, c: Path) -> Built:
    # A plain pickle without torch's magic number, named like a Hugging Face weights file.
    return one(write(w / "pytorch_model.bin", pickle.dumps(Reduce(os.system, (touch(c, "bin"),)), protocol=2)))


def h_zip_as_txt(w: Path, c: Path) -> Built:
    sd = dict(_linear_sd())
    sd["x"] = Reduce(os.system, (touch(c, "txt"),))
    return one(write(w / "weights.txt", torch_zip_bytes(sd)), arch=LINEAR, arch_kwargs=LINEAR_KW)


def h_ext_registry(w: Path, c: Path) -> Built:
    return one(write(w / "model.pt", P.proto(2) + b"\x82\x01" + P.bu(touch(c, "ext")) + P.TUPLE1 + P.REDUCE + P.STOP))


def h_inst(w: Path, c: Path) -> Built:
    return one(write(w / "model.pt", b"(S'" + touch(c, "inst").encode() + b"'\nios\nsystem\n."))


def h_obj(w: Path, c: Path) -> Built:
    data = P.proto(2) + P.MARK + P.glob("subprocess", "Popen") + P.bu(touch(c, "obj")) + b"o" + P.STOP
    return one(write(w / "model.pt", data))


def h_dotted_name(w: Path, c: Path) -> Built:
    # Protocol 4 resolves dotted names attribute by attribute, escaping module allowlists.
    body = (P.su("torch.nn.modules.module") + P.su("torch.load") + P.STACK_GLOBAL
            + P.su(str(w / "x.pt")) + P.TUPLE1 + P.REDUCE)
    return one(write(w / "model.pt", P.proto(4) + body + P.STOP))


def h_build_monkeypatch(w: Path, c: Path) -> Built:
    body = (P.glob("collections", "OrderedDict") + P.NONE + P.EMPTY_DICT + P.bu("__reduce__") + P.NONE
            + P.SETITEM + P.TUPLE2 + P.BUILD)
    return one(write(w / "model.pt", P.proto(2) + body + P.STOP))


def h_build_retype(w: Path, c: Path) -> Built:
    """A state_dict whose OrderedDict is retyped by BUILD's slot state (setattr __class__ to another
    allowlisted class): every name is allowlisted, the trick is in the state."""
    body = (P.glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + P.NONE + P.EMPTY_DICT
            + P.bu("__class__") + P.glob("collections", "Counter") + P.SETITEM + P.TUPLE2 + P.BUILD)
    return one(write(w / "model.pt", P.proto(2) + body + P.STOP))


def h_deep_nesting(w: Path, c: Path) -> Built:
    n = 5000
    return one(write(w / "model.pt", P.proto(2) + P.EMPTY_LIST * n + P.APPEND * (n - 1) + P.STOP))


def h_pt2_sample_inputs(w: Path, c: Path) -> Built:
    # torch.export.load retries a failed weights_only load of the sample inputs with
    # weights_only=False (torch/_export/serde/serialize.py, deserialize_torch_artifact).
    torch = _torch()
    src = w / "clean.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(2, 4),)), str(src))
    evil = torch_zip_bytes({"x": Reduce(os.system, (touch(c, "pt2"),))})
    out = w / "model.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = evil if info.filename.endswith("sample_inputs/model.pt") else zin.read(info)
            zout.writestr(info.filename, data)
    src.unlink()
    return one(out)


def h_cloudpickle_main_class(w: Path, c: Path) -> Built:
    import mlflow.pytorch
    import numpy as np

    torch = _torch()

    def forward(self, x):
        return self.l(x)

    def init(self):
        torch.nn.Module.__init__(self)
        self.l = torch.nn.Linear(4, 2)

    # A class defined in a notebook / __main__: cloudpickle serializes it by value.
    cls = type("MyNet", (torch.nn.Module,), {"__init__": init, "forward": forward, "__module__": "__main__"})
    mlflow.pytorch.save_model(cls(), str(w / "model"), serialization_format="pickle",
                              input_example=np.zeros((2, 4), dtype="float32"), pip_requirements=["torch"])
    return Built(paths=[w / "model"])


# -- archives ------------------------------------------------------------------------------------


def _real(w: Path, name: str = "model.pt") -> bytes:
    return torch_zip_bytes(_linear_sd())


def c_truncated_zip(w: Path, c: Path) -> Built:
    data = _real(w)
    return one(write(w / "model.pt", data[: len(data) // 2]), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_bad_crc(w: Path, c: Path) -> Built:
    data = bytearray(_real(w))
    zf = zipfile.ZipFile(io.BytesIO(bytes(data)))
    info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
    lh = info.header_offset
    nlen, elen = struct.unpack_from("<HH", data, lh + 26)
    data[lh + 30 + nlen + elen] ^= 0xFF
    return one(write(w / "model.pt", bytes(data)), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_fake_magic(w: Path, c: Path) -> Built:
    return one(write(w / "model.pt", b"PK\x03\x04" + os.urandom(2000)))


def c_encrypted(w: Path, c: Path) -> Built:
    data = _real(w)
    name = next(n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith("data.pkl"))
    data = patch_zip(data, name, local_flags=0x0809, cd_flags=0x0809)
    return one(write(w / "model.pt", data), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_patched_flag(w: Path, c: Path) -> Built:
    data = _real(w)
    name = next(n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith("data/0"))
    data = patch_zip(data, name, local_flags=0x0828, cd_flags=0x0828)
    return one(write(w / "model.pt", data), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_name_mismatch(w: Path, c: Path) -> Built:
    data = _real(w)
    name = next(n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith("data.pkl"))
    data = patch_zip(data, name, local_name=name[:-3].encode() + b"pkX")
    return one(write(w / "model.pt", data), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_overlap(w: Path, c: Path) -> Built:
    pkl, storages = benign_pkl()
    hidden_payload = os_system_pickle(touch(c, "overlap"))
    hidden = Z("archive/extra.pkl", hidden_payload)
    hidden_bytes = craft_zip([hidden])[: 30 + len(hidden.name) + len(hidden_payload)]
    entries = torch_layout(pkl, storages)
    # The carrier's data holds a complete local header + data of the hidden entry.
    carrier = Z("archive/data/2", hidden_bytes)
    entries.insert(2, carrier)
    blob = craft_zip(entries)
    carrier_data = blob.find(hidden_bytes)
    entries.append(Z("archive/extra.pkl", hidden_payload, cd_offset=carrier_data, in_local=False))
    return one(write(w / "model.pt", craft_zip(entries)), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_deflate_bomb(w: Path, c: Path) -> Built:
    pkl, storages = benign_pkl()
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    size = 64 * 2**20
    chunk = b"\x00" * 2**20
    packed = b"".join(co.compress(chunk) for _ in range(size // len(chunk))) + co.flush()
    crc = 0
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    entries = torch_layout(pkl, storages)
    entries.insert(2, Z("archive/data/bomb", b"", method=8, payload=packed, usize=size, crc=crc))
    return one(write(w / "model.pt", craft_zip(entries)), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_deflated_torch(w: Path, c: Path) -> Built:
    src = zipfile.ZipFile(io.BytesIO(_real(w)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in src.infolist():
            zout.writestr(info.filename, src.read(info))
    return one(write(w / "model.pt", out.getvalue()), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_traversal(w: Path, c: Path) -> Built:
    pkl, storages = benign_pkl()
    entries = torch_layout(pkl, storages)
    entries.append(Z("archive/../../etc/cron.d/evil", b"* * * * * root touch /tmp/x\n"))
    return one(write(w / "model.pt", craft_zip(entries)), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_absolute(w: Path, c: Path) -> Built:
    pkl, storages = benign_pkl()
    entries = torch_layout(pkl, storages)
    entries.append(Z("/etc/evil", b"x"))
    return one(write(w / "model.pt", craft_zip(entries)), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_duplicate(w: Path, c: Path) -> Built:
    pkl, storages = benign_pkl()
    entries = torch_layout(pkl, storages)
    entries.insert(1, Z("archive/data.pkl", os_system_pickle(touch(c, "dup"))))
    return one(write(w / "model.pt", craft_zip(entries)), arch=LINEAR, arch_kwargs=LINEAR_KW)


def c_too_many_entries(w: Path, c: Path) -> Built:
    sd = {f"t{i}": _torch().zeros(1) for i in range(40)}
    return one(save_torch(w / "model.pt", sd), env={"CKPT_STAGE_MAX_ARCHIVE_ENTRIES": "20"})


def c_zip_not_torch(w: Path, c: Path) -> Built:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("weights/readme.md", "not a checkpoint")
    return one(write(w / "model.pt", out.getvalue()))


# -- lying tensor metadata -----------------------------------------------------------------------


def _lying_zip(w: Path, obj, storages: dict[str, bytes]) -> Built:
    return one(write(w / "model.pt", craft_zip(torch_layout(lying_pkl(obj), storages))))


def m_storage_smaller(w: Path, c: Path) -> Built:
    s = _FakeStorage("0", 8)
    return _lying_zip(w, OrderedDict(weight=_FakeTensor(s, (1000, 1000), (1000, 1))), {"0": _f32(8)})


def m_huge_numel(w: Path, c: Path) -> Built:
    s = _FakeStorage("0", 2**40)
    return _lying_zip(w, OrderedDict(weight=_FakeTensor(s, (2**20, 2**20), (2**20, 1))), {"0": _f32(8)})


def m_offset_past_end(w: Path, c: Path) -> Built:
    s = _FakeStorage("0", 8)
    return _lying_zip(w, OrderedDict(weight=_FakeTensor(s, (2, 4), (4, 1), offset=6)), {"0": _f32(8)})


def m_missing_record(w: Path, c: Path) -> Built:
    s = _FakeStorage("7", 8)
    return _lying_zip(w, OrderedDict(weight=_FakeTensor(s, (2, 4), (4, 1))), {"0": _f32(8)})


def m_legacy_truncated(w: Path, c: Path) -> Built:
    path = save_torch(w / "legacy.pt", _linear_sd(), _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    return one(write(path, data[:-20]), arch=LINEAR, arch_kwargs=LINEAR_KW)


def m_pt2_weight_lies(w: Path, c: Path) -> Built:
    torch = _torch()
    src = w / "clean.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(2, 4),)), str(src))
    out = w / "model.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                for meta in cfg["config"].values():
                    meta["tensor_meta"]["sizes"] = [{"as_int": 4096}, {"as_int": 4096}]
                    meta["tensor_meta"]["strides"] = [{"as_int": 4096}, {"as_int": 1}]
                data = json.dumps(cfg).encode()
            zout.writestr(info.filename, data)
    src.unlink()
    return one(out)


def m_resource_limit(w: Path, c: Path) -> Built:
    path = _st_file(w / "model.safetensors", {"w": {"dtype": "F32", "shape": [2 * 2**20], "data_offsets": [0, 8 * 2**20]}},
                    b"\x00" * (8 * 2**20))
    return one(path, env={"CKPT_STAGE_WORKER_CLASSES": "tiny=32MiB"})


def m_pickle_over_limit(w: Path, c: Path) -> Built:
    sd = {f"layer{i}.weight": _torch().zeros(1) for i in range(50)}
    return one(save_torch(w / "model.pt", sd), env={"CKPT_STAGE_MAX_PICKLE_BYTES": "1000"})


# -- safetensors header abuse ---------------------------------------------------------------------

_T = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}


def s_header_too_large(w: Path, c: Path) -> Built:
    return one(_st_file(w / "model.safetensors", {"w": _T}, _f32(8), length=200_000_000))


def s_header_past_eof(w: Path, c: Path) -> Built:
    return one(_st_file(w / "model.safetensors", {"w": _T}, _f32(8), length=100_000))


def s_bad_json(w: Path, c: Path) -> Built:
    return one(_st_file(w / "model.safetensors", b'{"w": {"dtype": "F32", ', _f32(8)))


def s_not_object(w: Path, c: Path) -> Built:
    return one(_st_file(w / "model.safetensors", [1, 2, 3], _f32(8)))


def s_unknown_dtype(w: Path, c: Path) -> Built:
    return one(_st_file(w / "model.safetensors", {"w": {**_T, "dtype": "F128"}}, _f32(8)))


def s_negative_shape(w: Path, c: Path) -> Built:
    return one(_st_file(w / "model.safetensors", {"w": {**_T, "shape": [-2, -4]}}, _f32(8)))


def s_size_mismatch(w: Path, c: Path) -> Built:
    return one(_st_file(w / "model.safetensors", {"w": {**_T, "shape": [4, 4]}}, _f32(8)))


def s_out_of_range(w: Path, c: Path) -> Built:
    return one(_st_file(w / "model.safetensors", {"w": {**_T, "data_offsets": [64, 96]}}, _f32(8)))


def s_overlap(w: Path, c: Path) -> Built:
    hdr = {"a": _T, "b": {**_T, "data_offsets": [16, 48]}}
    return one(_st_file(w / "model.safetensors", hdr, _f32(12)))


def s_gap(w: Path, c: Path) -> Built:
    hdr = {"a": _T, "b": {**_T, "data_offsets": [40, 72]}}
    return one(_st_file(w / "model.safetensors", hdr, _f32(18)))


def s_trailing(w: Path, c: Path) -> Built:
    return one(_st_file(w / "model.safetensors", {"w": _T}, _f32(8) + b"hidden payload"))


def s_bad_metadata(w: Path, c: Path) -> Built:
    return one(_st_file(w / "model.safetensors", {"__metadata__": {"epoch": 3}, "w": _T}, _f32(8)))


def s_duplicate_key(w: Path, c: Path) -> Built:
    raw = ('{"w": ' + json.dumps(_T) + ', "w": ' + json.dumps({**_T, "shape": [8]}) + "}").encode()
    return one(_st_file(w / "model.safetensors", raw, _f32(8)))


def s_huge_shape(w: Path, c: Path) -> Built:
    hdr = {"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}
    return one(_st_file(w / "model.safetensors", hdr, _f32(8)))


# -- not checkpoints / unsupported formats ----------------------------------------------------------


def n_empty(w: Path, c: Path) -> Built:
    return one(write(w / "model.pt", b""))


def n_png(w: Path, c: Path) -> Built:
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return one(write(w / "model.pt", png + b"\x00" * 64))


def n_gzip(w: Path, c: Path) -> Built:
    return one(write(w / "model.pt", gzip.compress(_real(w))))


def n_text(w: Path, c: Path) -> Built:
    return one(write(w / "model.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"))


def n_mlflow_dir_without_model(w: Path, c: Path) -> Built:
    d = w / "model"
    write(d / "MLmodel", b"flavors:\n  python_function:\n    loader_module: mlflow.pytorch\n")
    write(d / "conda.yaml", b"channels:\n- conda-forge\ndependencies:\n- python=3.11\n")
    write(d / "requirements.txt", b"torch==2.13.0\n")
    return Built(paths=[d])


def n_plain_pickle(w: Path, c: Path) -> Built:
    # pickle.dump of a state dict: no torch header, so torch.load cannot read it at all.
    return one(write(w / "model.pkl", pickle.dumps({"weight": [[0.0] * 4] * 2, "bias": [0.0, 0.0]}, protocol=4)))


def u_seven_zip(w: Path, c: Path) -> Built:
    return one(write(w / "model.pt", b"7z\xbc\xaf\x27\x1c\x00\x04" + os.urandom(200)))


def u_legacy_tar(w: Path, c: Path) -> Built:
    path = w / "model.pt"
    with tarfile.open(path, "w") as tar:
        for name, obj in (("sys_info", {"protocol_version": 1001}), ("pickle", {"weight": 1}),
                          ("storages", []), ("tensors", [])):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return one(path)


# -- the table --------------------------------------------------------------------------------------


def _q(name, build, codes, contains, hostile=False, slow=False) -> Case:
    return Case(name, build, "quarantine", tuple(codes) if isinstance(codes, list | tuple) else (codes,),
                tuple(contains) if isinstance(contains, list | tuple) else (contains,), hostile, slow)


CASES: list[Case] = [
    # benign
    Case("static_benign_state_dict", b_state_dict, "pass"),
    Case("static_benign_nested_state_dict", b_nested_state_dict, "pass"),
    Case("static_benign_safetensors", b_safetensors, "pass"),
    Case("static_benign_legacy_state_dict", b_legacy, "pass"),
    Case("static_benign_mlflow_pickle_sequential", b_mlflow_pickle, "pass"),
    Case("static_benign_mlflow_pt2", b_mlflow_pt2, "pass"),
    # code execution
    _q("static_reduce_os_system", h_os_system, UNSAFE, "posix.system", hostile=True),
    _q("static_reduce_subprocess_popen", h_subprocess, UNSAFE, "subprocess.Popen", hostile=True),
    _q("static_reduce_builtins_eval", h_eval, UNSAFE, "builtins.eval", hostile=True),
    _q("static_reduce_builtins_exec", h_exec, UNSAFE, "builtins.exec", hostile=True),
    _q("static_getattr_import", h_getattr_import, UNSAFE, "builtins.getattr", hostile=True),
    _q("static_importlib_import_module", h_importlib, UNSAFE, "importlib.import_module", hostile=True),
    _q("static_pkgutil_resolve_name", h_pkgutil, UNSAFE, "pkgutil.resolve_name", hostile=True),
    _q("static_runpy_run_path", h_runpy, UNSAFE, "runpy.run_path", hostile=True),
    _q("static_pip_main", h_pip_main, UNSAFE, "pip.main", hostile=True),
    _q("static_torch_inductor_write", h_inductor, UNSAFE, "torch._inductor.codecache.write_atomic", hostile=True),
    _q("static_torch_jit_exec_wrapper", h_jit, UNSAFE, "torch.jit.unsupported_tensor_ops.execWrapper", hostile=True),
    _q("static_partial_torch_load", h_partial_torch_load, UNSAFE, "functools.partial", hostile=True),
    _q("static_socket_connect", h_socket, UNSAFE, "socket.create_connection", hostile=True),
    # scanner confusion
    _q("static_benign_then_evil_stream", h_benign_then_evil, UNSAFE, "posix.system", hostile=True),
    _q("static_legacy_trailing_payload", h_legacy_tail, UNSAFE, "posix.system", hostile=True),
    _q("static_memo_stack_global", h_memo_stack_global, UNSAFE, "os.system", hostile=True),
    _q("static_memo_overwrite", h_memo_overwrite, UNSAFE, "os.system", hostile=True),
    _q("static_memo_unset_get", h_memo_unset, UNSAFE, "never set", hostile=True),
    _q("static_stack_global_strings", h_stack_global_strings, UNSAFE, "STACK_GLOBAL", hostile=True),
    _q("static_frame_length_lie", h_frame_lie, UNSAFE, "FRAME", hostile=True),
    _q("static_payload_then_broken", h_payload_then_broken, UNSAFE, "posix.system", hostile=True),
    _q("static_pickle_named_json", h_pickle_as_json, UNSAFE, "posix.system", hostile=True),
    _q("static_pickle_named_bin_no_magic", h_pickle_as_bin, UNSAFE, "posix.system", hostile=True),
    _q("static_zip_named_txt", h_zip_as_txt, UNSAFE, "posix.system", hostile=True),
    _q("static_ext_registry", h_ext_registry, UNSAFE, "extension registry", hostile=True),
    _q("static_inst_opcode", h_inst, UNSAFE, "os.system", hostile=True),
    _q("static_obj_opcode", h_obj, UNSAFE, "subprocess.Popen", hostile=True),
    _q("static_dotted_global_name", h_dotted_name, UNSAFE, "torch.load", hostile=True),
    _q("static_build_on_global", h_build_monkeypatch, UNSAFE, "monkey-patching", hostile=True),
    _q("static_build_retypes_object", h_build_retype, UNSAFE, "retypes the object", hostile=True),
    _q("static_deep_nesting", h_deep_nesting, UNSAFE, "nest more than", hostile=True),
    _q("static_pt2_evil_sample_inputs", h_pt2_sample_inputs, UNSAFE, "posix.system", hostile=True),
    _q("static_cloudpickle_main_class", h_cloudpickle_main_class, UNSAFE, ["cloudpickle", "code_paths"]),
    # archive tricks
    _q("static_zip_truncated", c_truncated_zip, CORRUPT, "end-of-central-directory"),
    _q("static_zip_bad_crc", c_bad_crc, CORRUPT, "CRC32"),
    _q("static_zip_fake_magic", c_fake_magic, CORRUPT, "end-of-central-directory"),
    _q("static_zip_encrypted_entry", c_encrypted, UNSUPPORTED, "encrypted"),
    _q("static_zip_patched_flag", c_patched_flag, CORRUPT, "0x0020"),
    _q("static_zip_name_mismatch", c_name_mismatch, CORRUPT, "local header says"),
    _q("static_zip_overlapping_entries", c_overlap, CORRUPT, "overlap", hostile=True),
    _q("static_zip_deflate_bomb", c_deflate_bomb, CORRUPT, "compression bomb"),
    _q("static_zip_deflated_torch_entries", c_deflated_torch, CORRUPT, "deflate-compressed"),
    _q("static_zip_path_traversal", c_traversal, CORRUPT, "path traversal"),
    _q("static_zip_absolute_path", c_absolute, CORRUPT, "absolute path"),
    _q("static_zip_duplicate_names", c_duplicate, CORRUPT, "two entries are named", hostile=True),
    _q("static_zip_too_many_entries", c_too_many_entries, CORRUPT, "CKPT_STAGE_MAX_ARCHIVE_ENTRIES"),
    _q("static_zip_not_torch_layout", c_zip_not_torch, NOT_CKPT, "torch layouts"),
    # lying tensor metadata
    _q("static_meta_storage_smaller_than_shape", m_storage_smaller, CORRUPT, "needs"),
    _q("static_meta_huge_declared_numel", m_huge_numel, CORRUPT, "declares"),
    _q("static_meta_offset_past_storage", m_offset_past_end, CORRUPT, "needs"),
    _q("static_meta_missing_storage_record", m_missing_record, CORRUPT, "no record"),
    _q("static_meta_legacy_truncated", m_legacy_truncated, CORRUPT, "storage"),
    _q("static_meta_pt2_weight_lies", m_pt2_weight_lies, CORRUPT, "needs"),
    _q("static_resource_estimate_over_limit", m_resource_limit, RESOURCE, "tiny"),
    _q("static_resource_pickle_over_scan_limit", m_pickle_over_limit, RESOURCE, "CKPT_STAGE_MAX_PICKLE_BYTES"),
    # safetensors header abuse
    _q("static_st_header_too_large", s_header_too_large, CORRUPT, "100 MB"),
    _q("static_st_header_past_eof", s_header_past_eof, CORRUPT, "past the end"),
    _q("static_st_bad_json", s_bad_json, CORRUPT, "not valid JSON"),
    _q("static_st_not_object", s_not_object, CORRUPT, "not an object"),
    _q("static_st_unknown_dtype", s_unknown_dtype, CORRUPT, "F128"),
    _q("static_st_negative_shape", s_negative_shape, CORRUPT, "non-negative"),
    _q("static_st_size_mismatch", s_size_mismatch, CORRUPT, "data_offsets span"),
    _q("static_st_offsets_out_of_range", s_out_of_range, CORRUPT, "past the data section"),
    _q("static_st_overlap", s_overlap, CORRUPT, "overlaps"),
    _q("static_st_gap", s_gap, CORRUPT, "gap"),
    _q("static_st_trailing_bytes", s_trailing, CORRUPT, "after the last tensor"),
    _q("static_st_bad_metadata", s_bad_metadata, CORRUPT, "__metadata__"),
    _q("static_st_duplicate_key", s_duplicate_key, CORRUPT, "duplicate key"),
    _q("static_st_huge_shape", s_huge_shape, CORRUPT, "past the data section"),
    # not checkpoints, unsupported
    _q("static_empty_file", n_empty, NOT_CKPT, "empty"),
    _q("static_png_renamed_pt", n_png, NOT_CKPT, "PNG"),
    _q("static_gzip_renamed_pt", n_gzip, NOT_CKPT, "gzip"),
    _q("static_text_renamed_pt", n_text, NOT_CKPT, "text"),
    _q("static_mlflow_dir_without_weights", n_mlflow_dir_without_model, NOT_CKPT, "none of the"),
    _q("static_plain_pickle_no_torch_header", n_plain_pickle, NOT_CKPT, "plain Python pickle"),
    _q("static_seven_zip", u_seven_zip, UNSUPPORTED, "7-Zip"),
    _q("static_legacy_tar", u_legacy_tar, UNSUPPORTED, "tar"),
]
