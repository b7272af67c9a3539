"""Pickles and archives built to exhaust a scanner: quadratic mutation chains, deep nesting, memo and
stack floods, lying lengths, millions of unsafe globals, many streams, huge central directories and
deflate bombs. Each generator returns bytes (about a megabyte unless its name says otherwise); the
scan of each must finish in bounded time and memory (tests/unit/test_scan_bounds.py).

Not a corpus module (no ``CASES``): the generators are shared by the bound tests and by anyone
measuring the scanner (``python -m tests.corpus.pickle_bombs`` prints time and peak memory per input).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

from tests.corpus.static_cases import P, Z, craft_zip

N = 200_000
"""Repetitions per generator: ~1 MB of opcodes, enough to make anything quadratic run for hours."""


def su(s: str) -> bytes:
    return P.su(s)


def proto4(body: bytes) -> bytes:
    return P.proto(4) + body + P.STOP


# -- quadratic mutation chains -------------------------------------------------------------------


def build_append_chain(n: int = N) -> bytes:
    """OrderedDict(), n BUILDs, then n APPENDs: each BUILD after the first grew a list of states that
    each APPEND searched from the start for its item holder (the 1.2 MB file that ran for hours)."""
    return proto4(P.glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE
                  + (P.EMPTY_DICT + P.BUILD) * n + (P.NONE + P.APPEND) * n)


def build_chain(n: int = N) -> bytes:
    return proto4(P.glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + (P.EMPTY_DICT + P.BUILD) * n)


def appends_chain(n: int = N) -> bytes:
    return proto4(P.EMPTY_LIST + (P.MARK + P.NONE + P.NONE + b"e") * n)


def setitems_chain(n: int = N) -> bytes:
    return proto4(P.EMPTY_DICT + (P.MARK + b"K\x01" + P.NONE + b"u") * n)


def setitem_on_call_chain(n: int = N) -> bytes:
    return proto4(P.glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + (b"K\x01" + P.NONE + P.SETITEM) * n)


# -- nesting --------------------------------------------------------------------------------------


def mark_tower(n: int = N) -> bytes:
    return proto4(P.MARK * n + P.NONE)


def nested_tuples(n: int = N) -> bytes:
    return proto4(P.NONE + P.TUPLE1 * n)


def nested_lists(n: int = N) -> bytes:
    return proto4(P.EMPTY_LIST * n + P.APPEND * (n - 1))


def nested_dicts(n: int = N // 2) -> bytes:
    return proto4(P.EMPTY_DICT + (b"K\x01" + P.EMPTY_DICT) * n + P.SETITEM * n)


def shared_dag(n: int = N // 4) -> bytes:
    """Each list holds its predecessor twice (through the memo): 2^n paths, n nodes."""
    body = P.EMPTY_LIST + b"r" + struct.pack("<I", 0)
    for i in range(1, n):
        body += (P.EMPTY_LIST + P.MARK + b"j" + struct.pack("<I", i - 1) + b"j" + struct.pack("<I", i - 1) + b"e"
                 + b"r" + struct.pack("<I", i))
    return proto4(body)


# -- floods -------------------------------------------------------------------------------------


def memo_flood(n: int = 1_000_000) -> bytes:
    return proto4(P.NONE + P.MEMOIZE * n)


def memo_overwrite_flood(n: int = 500_000) -> bytes:
    return proto4(P.NONE + P.binput(0) * n)


def dup_flood(n: int = 2_000_000) -> bytes:
    return proto4(P.NONE + b"2" * n)


def unsafe_globals_flood(n: int = 1_000_000) -> bytes:
    """1 M imports of os.system (five bytes each, through the memo)."""
    head = su("posix") + P.MEMOIZE + P.POP + su("system") + P.MEMOIZE + P.POP
    return proto4(head + (P.binget(0) + P.binget(1) + P.STACK_GLOBAL + P.POP) * n + P.NONE)


def distinct_unsafe_globals(n: int = 100_000) -> bytes:
    return P.proto(2) + b"".join(b"cm%d\nf\n0" % i for i in range(n)) + P.NONE + P.STOP


def factory_flood(n: int = 500_000) -> bytes:
    """builtins.list is only allowed as a defaultdict factory: each one waits for STOP to be decided."""
    return P.proto(2) + (P.glob("builtins", "list") + P.POP) * n + P.NONE + P.STOP


def reduce_chain(n: int = N) -> bytes:
    """f(None)(None)(None)...: every call result keeps its callee alive."""
    return P.proto(2) + P.glob("posix", "system") + (P.NONE + P.TUPLE1 + P.REDUCE) * n + P.STOP


# -- lying lengths -------------------------------------------------------------------------------


def binunicode_lie() -> bytes:
    return P.proto(2) + b"X" + struct.pack("<I", 2**31) + b"abc"


def binbytes8_lie() -> bytes:
    return P.proto(4) + b"\x8e" + struct.pack("<Q", 2**62) + b"abc"


def long4_lie() -> bytes:
    return P.proto(2) + b"\x8b" + struct.pack("<i", 2**31 - 1) + b"\x01" * 16


def long4_huge() -> bytes:
    """A real 8 MB integer: int.from_bytes is linear; str() of it would not be."""
    return P.proto(2) + b"\x8b" + struct.pack("<i", 8 * 2**20) + b"\x7f" * (8 * 2**20) + P.STOP


def frame_lies(n: int = N) -> bytes:
    return P.proto(4) + (b"\x95" + struct.pack("<Q", 2**40) + P.NONE + P.POP) * n + P.NONE + P.STOP


def many_streams(n: int = 500_000) -> bytes:
    return (P.NONE + P.STOP) * n


# -- archives -------------------------------------------------------------------------------------


def zip_many_entries(n: int = 65_535) -> bytes:
    return craft_zip([Z(f"archive/e{i}", b"") for i in range(n)])


def zip_many_pickles(n: int = 20_000) -> bytes:
    """A torch layout with thousands of small hidden pickles (each a stream to walk, each importing
    os.system at its end)."""
    entries = [Z("archive/data.pkl", P.proto(2) + P.NONE + P.STOP), Z("archive/version", b"3\n")]
    hidden = P.proto(2) + P.EMPTY_LIST + (P.NONE + P.APPEND) * 50 + P.glob("posix", "system") + P.POP + P.STOP
    entries += [Z(f"archive/x{i}.bin", hidden + bytes([i % 256])) for i in range(n)]
    return craft_zip(entries)


def zip64_lie() -> bytes:
    """A central directory entry whose zip64 extra field claims an exabyte."""
    data = craft_zip([Z("archive/data.pkl", P.proto(2) + P.NONE + P.STOP)])
    b = bytearray(data)
    cd = b.find(b"PK\x01\x02")
    struct.pack_into("<II", b, cd + 20, 0xFFFFFFFF, 0xFFFFFFFF)
    return bytes(b)


def deflate_bomb(size: int = 1 * 2**30) -> bytes:
    """A deflated pickle member that inflates to a gigabyte of zeros."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\x00" * 2**20
    payload = b"".join(comp.compress(chunk) for _ in range(size // 2**20)) + comp.flush()
    return craft_zip([Z("archive/data.pkl", b"", method=8, payload=payload, usize=size, crc=0),
                      Z("archive/version", b"3\n")])


PICKLES: dict[str, Callable[[], bytes]] = {
    "build_append_chain": build_append_chain,
    "build_chain": build_chain,
    "appends_chain": appends_chain,
    "setitems_chain": setitems_chain,
    "setitem_on_call_chain": setitem_on_call_chain,
    "mark_tower": mark_tower,
    "nested_tuples": nested_tuples,
    "nested_lists": nested_lists,
    "nested_dicts": nested_dicts,
    "shared_dag": shared_dag,
    "memo_flood": memo_flood,
    "memo_overwrite_flood": memo_overwrite_flood,
    "dup_flood": dup_flood,
    "unsafe_globals_flood": unsafe_globals_flood,
    "distinct_unsafe_globals": distinct_unsafe_globals,
    "factory_flood": factory_flood,
    "reduce_chain": reduce_chain,
    "binunicode_lie": binunicode_lie,
    "binbytes8_lie": binbytes8_lie,
    "long4_lie": long4_lie,
    "long4_huge": long4_huge,
    "frame_lies": frame_lies,
    "many_streams": many_streams,
}

ARCHIVES: dict[str, Callable[[], bytes]] = {
    "zip_many_entries": zip_many_entries,
    "zip_many_pickles": zip_many_pickles,
    "zip64_lie": zip64_lie,
    "deflate_bomb": deflate_bomb,
}


def measure(data: bytes, name: str = "model.pt", *, trace: bool = True) -> tuple[float, int, list[str]]:
    """(seconds, tracemalloc peak bytes or 0, reason codes) of scanning ``data`` as one file."""
    import tempfile
    import time
    import tracemalloc
    from pathlib import Path

    from ckpt_stage.config import Settings
    from ckpt_stage.scan import scan_version

    with tempfile.TemporaryDirectory() as d:
        Path(d, name).write_bytes(data)
        if trace:
            tracemalloc.start()
        t0 = time.perf_counter()
        result = scan_version(Path(d), [name], Settings())
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        if trace:
            tracemalloc.stop()
    return elapsed, peak, sorted({f.code.value for f in result.findings if f.code})


if __name__ == "__main__":  # pragma: no cover - a measuring tool
    import sys

    args = sys.argv[1:]
    trace = "--time" not in args  # --time: wall time without tracemalloc's (large) overhead
    wanted = {a for a in args if not a.startswith("--")}
    for name, gen in {**PICKLES, **ARCHIVES}.items():
        if wanted and name not in wanted:
            continue
        data = gen()
        secs, peak, codes = measure(data, trace=trace)
        print(f"{name:28s} {len(data) / 2**20:8.2f} MiB {secs:8.2f} s  peak {peak / 2**20:8.1f} MiB  {codes}",
              flush=True)
