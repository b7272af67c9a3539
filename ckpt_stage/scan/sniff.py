"""What a file is, from its first bytes (never from its name: a pickle named ``.bin`` or
``config.json`` is a pickle; torch.load reads any path by content, except that torch 2.13 hands a path
ending in ``.safetensors`` to the safetensors reader: ``formats._name_and_content`` holds the two together).

``sniff`` returns a coarse kind; the format-specific readers then verify the structure (a file
that merely starts with ``PK\\x03\\x04`` is not yet a torch archive).
"""

from __future__ import annotations

import enum
import posixpath

from ckpt_stage.config import Settings
from ckpt_stage.scan._common import Region
from ckpt_stage.scan.allowlist import valid_module, valid_name
from ckpt_stage.scan.pickles import LEGACY_TORCH_MAGIC, StreamReport, scan_stream
from ckpt_stage.scan.safetensors import check_safetensors, looks_like_safetensors


class Kind(enum.StrEnum):
    EMPTY = "empty"
    ZIP = "zip"
    PICKLE = "pickle"
    PICKLE_TEXT = "pickle-text"
    """Maybe a protocol 0/1 pickle (no PROTO opcode): confirmed by parsing."""
    SAFETENSORS = "safetensors"
    TAR = "tar"
    SEVEN_ZIP = "7z"
    COMPRESSED = "compressed"
    IMAGE = "image"
    NATIVE = "native"
    OTHER_MODEL = "other-model"
    TEXT = "text"
    BINARY = "binary"


# (magic, offset, kind, description)
_MAGICS: tuple[tuple[bytes, int, Kind, str], ...] = (
    (b"7z\xbc\xaf\x27\x1c", 0, Kind.SEVEN_ZIP, "a 7-Zip archive"),
    (b"\x1f\x8b", 0, Kind.COMPRESSED, "a gzip file"),
    (b"BZh", 0, Kind.COMPRESSED, "a bzip2 file"),
    (b"\xfd7zXZ\x00", 0, Kind.COMPRESSED, "an xz file"),
    (b"\x28\xb5\x2f\xfd", 0, Kind.COMPRESSED, "a zstd file"),
    (b"Rar!\x1a\x07", 0, Kind.COMPRESSED, "a RAR archive"),
    (b"\x89PNG\r\n\x1a\n", 0, Kind.IMAGE, "a PNG image"),
    (b"\xff\xd8\xff", 0, Kind.IMAGE, "a JPEG image"),
    (b"GIF8", 0, Kind.IMAGE, "a GIF image"),
    (b"\x7fELF", 0, Kind.NATIVE, "an ELF executable or shared library"),
    (b"MZ", 0, Kind.NATIVE, "a Windows executable"),
    (b"\x93NUMPY", 0, Kind.OTHER_MODEL, "a numpy .npy array"),
    (b"\x89HDF\r\n\x1a\n", 0, Kind.OTHER_MODEL, "an HDF5 file (Keras?)"),
    (b"GGUF", 0, Kind.OTHER_MODEL, "a GGUF (llama.cpp) model"),
    (b"PK\x05\x06", 0, Kind.COMPRESSED, "an empty zip archive"),
    (b"ustar", 257, Kind.TAR, "a tar archive"),
)

#: Opcodes a protocol 0/1 pickle can start with (MARK, GLOBAL, INST, containers, scalars, PERSID...).
_PICKLE_TEXT_START = frozenset(b"(cl]}d)NIFLSVUTXJKMGhgqjpPBC")

#: File names of an MLflow model directory that describe the model rather than hold it.
METADATA_NAMES = frozenset({"MLmodel", "registered_model_meta", "LICENSE", "README", "MANIFEST"})
METADATA_EXTS = frozenset({".yaml", ".yml", ".json", ".txt", ".md", ".cfg", ".toml", ".ini", ".csv",
                           ".lock", ".log", ".html", ".rst", ".jsonl"})
#: Python source, bytecode and extension modules: not metadata but code a serving host may import
#: (MLflow puts a flavor's ``code`` folder on sys.path; Hugging Face ``auto_map`` imports repo files).
#: ``scan.mlflow_dir`` judges them; they are never checkpoints.
CODE_EXTS = frozenset({".py", ".pyc", ".pyo", ".pyw", ".pyz", ".so", ".pyd"})
#: Extensions that claim to be a checkpoint: if the content is something else, that is a finding.
CHECKPOINT_EXTS = frozenset({".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2", ".pkl", ".pickle",
                             ".tar", ".model", ".pth.tar", ".torchscript", ".jit", ".ptl", ".weights"})


def describe(kind: Kind, head: bytes) -> str:
    for magic, off, k, text in _MAGICS:
        if k is kind and head[off:off + len(magic)] == magic:
            return text
    return {Kind.EMPTY: "an empty file", Kind.TEXT: "a text file", Kind.BINARY: "unrecognised binary data",
            Kind.ZIP: "a zip archive", Kind.PICKLE: "a pickle", Kind.PICKLE_TEXT: "a text pickle",
            Kind.SAFETENSORS: "a safetensors file"}.get(kind, kind.value)


def sniff(region: Region) -> tuple[Kind, bytes]:
    """(kind, first bytes) of the region."""
    head = region.read(0, 512 + 8)
    if not head:
        return Kind.EMPTY, head
    if head.startswith(b"PK\x03\x04"):
        return Kind.ZIP, head
    if head[0] == 0x80 and len(head) > 1 and head[1] <= 5:
        # 0x80 is pickle's PROTO opcode, but also the low byte of one safetensors header length in
        # 256 (a small model's shard). The container whose structure checks out wins (a header that
        # is a JSON object exactly inside the file; its tensor entries are checked later, so a
        # truncated shard is reported as a broken safetensors file, not a broken pickle); a file
        # that is both is refused by ``live_pickle`` (the scan reports it, the worker never loads it).
        if looks_like_safetensors(head) and check_safetensors(region).header_ok:
            return Kind.SAFETENSORS, head
        return Kind.PICKLE, head
    if looks_like_safetensors(head):
        return Kind.SAFETENSORS, head
    for magic, off, kind, _ in _MAGICS:
        if head[off:off + len(magic)] == magic:
            return kind, head
    if head[0] in _PICKLE_TEXT_START:
        return Kind.PICKLE_TEXT, head
    if _is_text(head):
        return Kind.TEXT, head
    return Kind.BINARY, head


#: First window of a safetensors file read as a pickle: a real header breaks the stream within its
#: first dozen bytes (the zero high bytes of the length are no opcode), so this is nearly always enough.
_PICKLE_PROBE = 64 * 2**10


def live_pickle(region: Region, settings: Settings) -> StreamReport | None:
    """The file read the way ``torch.load`` reads a non-zip file (``pickle.load`` from offset 0), when
    that reading could *do* something; None when it is inert.

    It does something when the stream imports a well-formed global (imports run as they are parsed,
    even if the stream breaks later: a payload before a broken stream still runs), or when it ends with
    torch's legacy magic number (torch.load then reads further streams from the file). A stream that
    breaks, or ends with another value, is inert: without a global nothing can be called (``EXT*``
    opcodes find nothing in the copyreg registry, empty unless a global filled it), and torch.load
    stops at "invalid magic number".
    That keeps real safetensors files whose first bytes happen to parse (the length bytes, a key
    ending at a ``.``) from being refused.

    A safetensors file is accepted as safetensors only when this is None: a polyglot would be safe in
    our worker, which obeys the reading and uses the safetensors reader, but would run its pickle on a
    serving host that calls ``torch.load`` on it.
    """
    n = min(region.size, _PICKLE_PROBE)
    while True:
        rep = scan_stream(region.read(0, n), 0, settings)
        if rep.limit or _acts(rep):
            return rep
        if rep.end is not None:
            return None  # complete and inert
        broke_inside = rep.error is not None and rep.error.offset < n - 64
        if broke_inside or n >= region.size:
            return None
        if n >= settings.max_pickle_bytes:
            return rep  # not decided within the scanner's limit: not accepted as inert
        n = min(region.size, settings.max_pickle_bytes, n * 16)


def _acts(rep: StreamReport) -> bool:
    if rep.end is not None and rep.result == LEGACY_TORCH_MAGIC:
        return True
    return any(valid_module(g.module) and valid_name(g.name) for g in rep.globals)


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 4  # a multi-byte character cut at the sniff boundary
    return True


def extension(path: str) -> str:
    base = posixpath.basename(path).lower()
    if base.endswith(".pth.tar"):
        return ".pth.tar"
    return posixpath.splitext(base)[1]


def claims_checkpoint(path: str, *, mlflow_dir: bool) -> bool:
    """Whether a file's *name* says it is a checkpoint. Used only to decide if a file that turns
    out not to be one is a finding (``model.pt`` holding a PNG) or just a side file (``conda.yaml``)."""
    base = posixpath.basename(path)
    ext = extension(path)
    if base in METADATA_NAMES or ext in METADATA_EXTS or ext in CODE_EXTS:
        return False
    if ext in CHECKPOINT_EXTS:
        return True
    return not mlflow_dir
