"""Hidden pickles and scanner-confusion siblings the static scanner must decide on its own.

Hidden pickles: a pickle in any zip member is a pickle, whatever the member is called (``extra.bin``,
``.data/version``, an undeclared ``data/7``), however it is compressed, whatever its protocol (0/1 text
start without PROTO, 2, 4, 5, a FRAME first), in torch zips, TorchScript, ``.pt2`` and arbitrary
zips. Confusion: benign streams before a malicious one, memo slots holding globals, FRAME lies,
payloads before a deliberately broken stream, pickles under other names, no torch magic.

Every hostile payload would create a file in ``canary`` if it ran (tests/unit/test_scan_pickle_cases.py).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

from tests.corpus import Built, Case
from tests.corpus.static_cases import (
    CORRUPT,
    LINEAR,
    LINEAR_KW,
    UNSAFE,
    P,
    Reduce,
    Z,
    _linear_sd,
    _torch,
    benign_pkl,
    craft_zip,
    one,
    os_system_pickle,
    save_torch,
    torch_layout,
    touch,
    write,
)


def payload(canary: Path, tag: str, proto: int) -> bytes:
    return pickle.dumps(Reduce(os.system, (touch(canary, tag),)), protocol=proto)


def text_payload(canary: Path, tag: str) -> bytes:
    """Protocol 0, no PROTO opcode: starts with GLOBAL ('c')."""
    return b"cposix\nsystem\n(V" + touch(canary, tag).encode() + b"\ntR."


def frame_first_payload(canary: Path, tag: str) -> bytes:
    """No PROTO, starts with FRAME: CPython's unpickler runs it all the same."""
    body = P.su("posix") + P.su("system") + P.STACK_GLOBAL + P.su(touch(canary, tag)) + P.TUPLE1 + P.REDUCE + P.STOP
    return P.frame(body)


def _torch_zip_with(member: str, data: bytes, *, replace: bool = False, method: int = 0) -> bytes:
    pkl, storages = benign_pkl()
    entries = torch_layout(pkl, storages)
    if replace:
        entries = [e for e in entries if e.name != member]
    if method:
        import zlib

        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        entries.insert(-1, Z(member, data, method=8, payload=comp.compress(data) + comp.flush()))
    else:
        entries.insert(-1, Z(member, data))
    return craft_zip(entries)


def _zip_case(member: str, make, *, replace: bool = False, method: int = 0):
    def build(w: Path, c: Path) -> Built:
        data = _torch_zip_with(member, make(c), replace=replace, method=method)
        return one(write(w / "model.pt", data), arch=LINEAR, arch_kwargs=LINEAR_KW)

    return build


def h_undeclared_storage(w: Path, c: Path) -> Built:
    return _zip_case("archive/data/7", lambda c: payload(c, "data7", 2))(w, c)


def h_declared_storage_wrong_size(w: Path, c: Path) -> Built:
    # data/0 is declared (8 floats) but holds a pickle of another size: not a storage, so sniffed.
    return _zip_case("archive/data/0", lambda c: payload(c, "data0", 2), replace=True)(w, c)


def _protocol_case(proto: int):
    return _zip_case("archive/extra.bin", lambda c: payload(c, f"extra{proto}", proto))


def h_text_protocol_in_data_version(w: Path, c: Path) -> Built:
    return _zip_case("archive/.data/version", lambda c: text_payload(c, "dataversion"))(w, c)


def h_byteorder_replaced(w: Path, c: Path) -> Built:
    return _zip_case("archive/byteorder", lambda c: payload(c, "byteorder", 1), replace=True)(w, c)


def h_frame_first_member(w: Path, c: Path) -> Built:
    return _zip_case("archive/extra/meta", lambda c: frame_first_payload(c, "frame_member"))(w, c)


def h_deflated_member(w: Path, c: Path) -> Built:
    return _zip_case("archive/extra.dat", lambda c: text_payload(c, "deflated"), method=8)(w, c)


def h_arbitrary_zip(w: Path, c: Path) -> Built:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("weights/readme.md", "weights inside")
        z.writestr("weights/model.dat", text_payload(c, "arbitrary"))
    return one(write(w / "bundle.zip", out.getvalue()))


def h_torchscript_extra_file(w: Path, c: Path) -> Built:
    torch = _torch()
    path = w / "model.torchscript"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(path),
                   _extra_files={"meta.bin": payload(c, "ts_extra", 2)})
    return one(path)


def h_pt2_non_pkl_member(w: Path, c: Path) -> Built:
    torch = _torch()
    src = w / "clean.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(2, 4),)), str(src))
    out = w / "model.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
        zout.writestr(f"{prefix}/extra/notes.dat", text_payload(c, "pt2_text"))
        zout.writestr(f"{prefix}/extra/config.json", payload(c, "pt2_json", 4))
    src.unlink()
    return one(out)


# -- confusion siblings ------------------------------------------------------------------------------


def h_benign_proto4_then_text_payload(w: Path, c: Path) -> Built:
    data = pickle.dumps({"weights": [1.0, 2.0]}, protocol=4) + text_payload(c, "second_text")
    return one(write(w / "model.pt", data))


def h_evil_in_fifth_stream(w: Path, c: Path) -> Built:
    data = b"".join(pickle.dumps(i, protocol=2) for i in range(4)) + os_system_pickle(touch(c, "fifth"))
    return one(write(w / "model.pt", data))


def h_memo_holds_global(w: Path, c: Path) -> Built:
    # The global is memoized, popped and fetched back by BINGET to be called.
    body = (P.glob("posix", "system") + P.binput(3) + P.POP + P.EMPTY_DICT + P.POP
            + P.binget(3) + P.bu(touch(c, "memo_global")) + P.TUPLE1 + P.REDUCE)
    return one(write(w / "model.pt", P.proto(2) + body + P.STOP))


def h_memo_long_binget_global(w: Path, c: Path) -> Built:
    body = (P.glob("posix", "system") + b"r" + struct.pack("<I", 70000) + P.POP
            + b"j" + struct.pack("<I", 70000) + P.bu(touch(c, "long_get")) + P.TUPLE1 + P.REDUCE)
    return one(write(w / "model.pt", P.proto(2) + body + P.STOP))


def h_memo_swap_benign_global(w: Path, c: Path) -> Built:
    # Slot 0 first holds OrderedDict (what a lazy scanner remembers), then os.system.
    body = (P.glob("collections", "OrderedDict") + P.binput(0) + P.POP + P.glob("posix", "system") + P.binput(0)
            + P.POP + P.binget(0) + P.bu(touch(c, "swap")) + P.TUPLE1 + P.REDUCE)
    return one(write(w / "model.pt", P.proto(2) + body + P.STOP))


def h_frame_too_short(w: Path, c: Path) -> Built:
    body = P.su("posix") + P.su("system") + P.STACK_GLOBAL + P.su(touch(c, "frame_short")) + P.TUPLE1 + P.REDUCE
    return one(write(w / "model.pt", P.proto(4) + P.frame(body, declared=3) + P.STOP))


def h_frame_in_frame(w: Path, c: Path) -> Built:
    inner = P.frame(P.su("posix") + P.su("system") + P.STACK_GLOBAL)
    body = inner + P.su(touch(c, "frame_nested")) + P.TUPLE1 + P.REDUCE + P.STOP
    return one(write(w / "model.pt", P.proto(4) + P.frame(body, declared=len(body) + 40)))


def h_proto4_payload_then_truncated(w: Path, c: Path) -> Built:
    data = payload(c, "truncated4", 4)[:-1] + b"\x95" + struct.pack("<Q", 2**30)
    return one(write(w / "model.pt", data))


def h_text_payload_then_garbage(w: Path, c: Path) -> Built:
    return one(write(w / "model.pt", text_payload(c, "garbage")[:-1] + b"\xff\xfe\xfd"))


def h_pickle_named_safetensors(w: Path, c: Path) -> Built:
    return one(write(w / "model.safetensors", payload(c, "st_name", 2)))


def h_text_pickle_named_json(w: Path, c: Path) -> Built:
    from safetensors.torch import save_file

    st = w / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _linear_sd().items()}, str(st))
    return Built(paths=[st, write(w / "tokenizer.json", text_payload(c, "tok_json"))], arch=LINEAR,
                 arch_kwargs=LINEAR_KW)


def h_frame_first_file(w: Path, c: Path) -> Built:
    # No PROTO and no torch magic: the first byte is FRAME, which sniffing alone calls binary data.
    from safetensors.torch import save_file

    st = w / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _linear_sd().items()}, str(st))
    return Built(paths=[st, write(w / "extra", frame_first_payload(c, "frame_file"))], arch=LINEAR,
                 arch_kwargs=LINEAR_KW)


def b_torch_zip_with_extra_records(w: Path, c: Path) -> Built:
    # torch.save's own records (.data/serialization_id, byteorder, version) must not look like pickles.
    return one(save_torch(w / "model.pt", _linear_sd()), arch=LINEAR, arch_kwargs=LINEAR_KW)


def b_torchscript_text_extra(w: Path, c: Path) -> Built:
    torch = _torch()
    path = w / "model.torchscript"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(path),
                   _extra_files={"notes.txt": "hello world\nconfig\nvalue\n", "list.txt": "little endian"})
    return one(path)


def _q(name, build, codes, contains) -> Case:
    return Case(name, build, "quarantine", tuple(codes) if isinstance(codes, tuple) else (codes,),
                (contains,) if isinstance(contains, str) else tuple(contains), True)


CASES: list[Case] = [
    _q("hidden_pickle_undeclared_data_record", h_undeclared_storage, UNSAFE, "posix.system"),
    _q("hidden_pickle_declared_storage_wrong_size", h_declared_storage_wrong_size, (UNSAFE, CORRUPT), "posix.system"),
    *(_q(f"hidden_pickle_extra_bin_protocol_{p}", _protocol_case(p), UNSAFE, "system") for p in (0, 1, 2, 4, 5)),
    _q("hidden_pickle_text_in_data_version", h_text_protocol_in_data_version, UNSAFE, "posix.system"),
    _q("hidden_pickle_byteorder_replaced", h_byteorder_replaced, UNSAFE, "posix.system"),
    _q("hidden_pickle_frame_first_member", h_frame_first_member, UNSAFE, "posix.system"),
    _q("hidden_pickle_deflated_member", h_deflated_member, (UNSAFE, CORRUPT), "posix.system"),
    _q("hidden_pickle_arbitrary_zip", h_arbitrary_zip, UNSAFE, "posix.system"),
    _q("hidden_pickle_torchscript_extra_file", h_torchscript_extra_file, UNSAFE, "posix.system"),
    _q("hidden_pickle_pt2_non_pkl_members", h_pt2_non_pkl_member, UNSAFE, "posix.system"),
    _q("confusion_benign_proto4_then_text_payload", h_benign_proto4_then_text_payload, UNSAFE, "posix.system"),
    _q("confusion_evil_in_fifth_stream", h_evil_in_fifth_stream, UNSAFE, "posix.system"),
    _q("confusion_memo_holds_global", h_memo_holds_global, UNSAFE, "posix.system"),
    _q("confusion_memo_long_binget_global", h_memo_long_binget_global, UNSAFE, "posix.system"),
    _q("confusion_memo_swap_benign_global", h_memo_swap_benign_global, UNSAFE, "posix.system"),
    _q("confusion_frame_too_short", h_frame_too_short, UNSAFE, "posix.system"),
    _q("confusion_frame_in_frame", h_frame_in_frame, UNSAFE, "posix.system"),
    _q("confusion_proto4_payload_then_truncated", h_proto4_payload_then_truncated, UNSAFE, "posix.system"),
    _q("confusion_text_payload_then_garbage", h_text_payload_then_garbage, UNSAFE, "posix.system"),
    _q("confusion_pickle_named_safetensors", h_pickle_named_safetensors, UNSAFE, "posix.system"),
    _q("confusion_text_pickle_named_json", h_text_pickle_named_json, UNSAFE, "posix.system"),
    _q("confusion_frame_first_file_no_magic", h_frame_first_file, UNSAFE, "posix.system"),
    Case("hidden_benign_torch_zip_records", b_torch_zip_with_extra_records, "pass"),
    Case("hidden_benign_torchscript_text_extra_files", b_torchscript_text_extra, "pass"),
]
