"""dsmoe_runtime.hugepages: which mappings a session's creation added and which of them are
moved onto 2 MB pages (parsed from synthetic /proc/self/smaps texts), the move itself on real
memory where this Linux can do it (contents kept, sparse reserves left alone), and
DSMoESession's `huge_pages` option (same logits either way)."""
from __future__ import annotations

import json
import mmap
import subprocess
import sys

import numpy as np
import pytest

from dsmoe_runtime import DSMoESession, InputError
from dsmoe_runtime import hugepages as hp

MB = 1 << 20


def _maps(*entries) -> str:
    """A /proc/PID/maps text: (start, end, perms, path) per mapping."""
    return "".join(f"{start:x}-{end:x} {perms} 00000000 00:00 0" + (f"          {path}" if path else "") + "\n"
                   for start, end, perms, path in entries)


def test_parse_keeps_private_writable_anonymous_mappings_and_the_heap():
    text = _maps((0x1000, 0x3000, "rw-p", ""),
                 (0x10000, 0x20000, "rw-p", "[heap]"),
                 (0x30000, 0x40000, "r--p", "/usr/lib/libc.so.6"),
                 (0x40000, 0x50000, "rw-p", "/usr/lib/libc.so.6"),
                 (0x50000, 0x60000, "---p", ""),
                 (0x60000, 0x70000, "rw-p", "[stack]"),
                 (0x70000, 0x80000, "rw-s", ""),
                 (0x80000, 0x90000, "rw-p", ""))
    assert hp.parse_maps(text) == [(0x1000, 0x3000), (0x10000, 0x20000), (0x80000, 0x90000)]


def test_to_collapse_takes_new_and_grown_mappings_2mb_aligned():
    base = 0x7f0000000000
    unaligned = base + 3 * 4096
    before = [(base - 64 * MB, base - 32 * MB), (base + 100 * MB, base + 104 * MB)]
    after = [(base - 64 * MB, base - 32 * MB),                     # there before: left alone
             (unaligned, unaligned + 9 * MB),                      # new
             (base + 40 * MB + 4096, base + 42 * MB + 8192),       # new, no aligned 2 MB inside
             (base + 100 * MB, base + 110 * MB)]                   # grew (the heap, a merge)
    assert hp.to_collapse(before, after, huge=2 * MB) == [(base + 2 * MB, base + 8 * MB), (base + 100 * MB, base + 110 * MB)]


def test_runs_group_consecutive_huge_pages():
    H = 2 * MB
    assert hp._runs([], huge=H) == []
    assert hp._runs([0, H, 2 * H, 5 * H, 7 * H, 8 * H], huge=H) == [(0, 3 * H), (5 * H, 6 * H), (7 * H, 9 * H)]


def test_unavailable_when_turned_off(monkeypatch):
    monkeypatch.setenv(hp.ENV_VAR, "0")
    assert not hp.available()
    new = hp.NewMemory()
    assert not new.enabled
    new.collapse()
    assert new.wait(0) and new.bytes == 0


def _collapse_works() -> bool:
    """Whether this machine moves memory onto 2 MB pages (Linux 6.1+, THP madvise/always, 4 KB
    base pages: the sizes below assume them)."""
    if not hp.available() or hp.HUGE_PAGE != 2 * MB:
        return False
    region = _Region(4 * MB)
    region.touch(4 * MB)
    return hp.collapse([region.aligned(2 * MB)]) == 2 * MB


class _Region:
    """An anonymous private mapping (Python's mmap), its address known."""

    def __init__(self, size: int):
        self.map = mmap.mmap(-1, size + 2 * MB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.array = np.frombuffer(self.map, np.uint8)
        self.address = self.array.ctypes.data
        self.size = size

    def touch(self, nbytes: int) -> None:
        self.array[:nbytes] = 1

    def aligned(self, nbytes: int) -> tuple[int, int]:
        start = (self.address + hp.HUGE_PAGE - 1) & ~(hp.HUGE_PAGE - 1)
        return start, start + nbytes

    def huge_bytes(self) -> int:
        """AnonHugePages of this mapping's part of /proc/self/smaps (advice splits mappings)."""
        total, inside = 0, False
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split()
                if "-" in fields[0] and not fields[0].endswith(":"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    inside = start < self.address + self.size + 2 * MB and end > self.address
                elif inside and fields[0] == "AnonHugePages:":
                    total += int(fields[1]) * 1024
        return total


@pytest.mark.skipif(not _collapse_works(), reason="no transparent huge pages / MADV_COLLAPSE on this machine")
def test_new_memory_moves_resident_mappings_and_keeps_their_contents(rng):
    new = hp.NewMemory()
    dense, sparse = _Region(16 * MB), _Region(16 * MB)
    data = rng.integers(0, 256, dense.array.size, dtype=np.uint8)
    dense.array[:] = data
    sparse.touch(4096)  # reserved, one page used: collapsing it would make 16 MB resident
    new.collapse()
    assert new.wait(60)
    assert new.bytes >= 16 * MB
    assert dense.huge_bytes() >= 16 * MB
    assert sparse.huge_bytes() == 0
    np.testing.assert_array_equal(dense.array, data)


_CHILD = """
import json, sys
import numpy as np
from dsmoe_runtime import DSMoESession
path, ids, mask, out = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3]), sys.argv[4]
session = DSMoESession(path, threads=1)
done = session.huge_pages.wait(60)
logits, _ = session.forward(ids, mask, session.new_cache(ids.shape[0], 16))
np.save(out, logits)
print(json.dumps({"done": done, "bytes": session.huge_pages.bytes}))
"""


def test_session_option_is_checked_and_keeps_the_logits(tmp_path, rng):
    from dsmoe_export.exporter import export
    from dsmoe_export.synthetic import TinySpec, make_model_folder

    # Weights of 1-2 MB each; in a fresh process (the child) ONNX Runtime maps them anew, where
    # this process may reuse memory it freed.
    spec = TinySpec(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=2)
    folder = make_model_folder(tmp_path / "model", spec, seed=int(rng.integers(1 << 30)))
    path = tmp_path / "model.onnx"
    export(folder, path, progress=False)
    with pytest.raises(InputError, match="huge_pages: expected True or False"):
        DSMoESession(path, threads=1, huge_pages="yes")
    plain = DSMoESession(path, threads=1, huge_pages=False)
    assert plain.huge_pages.bytes == 0 and plain.huge_pages.wait(0)
    ids = rng.integers(0, spec.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    child = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "ids.npy"),
                            str(tmp_path / "mask.npy"), str(tmp_path / "logits.npy")],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["done"]
    if _collapse_works():
        assert report["bytes"] >= 4 * MB  # most of the ~12 MB of weights
    expected, _ = plain.forward(ids, mask, plain.new_cache(2, 16))
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), expected)


def test_session_turns_the_library_advice_off_while_it_creates(tmp_path, rng, monkeypatch, op_library):
    """The op library's own huge-page advice (synchronous, inside session creation) is off while a
    DSMoESession that moves its memory itself is created, and on again after; a session without
    huge_pages leaves it alone. The switch returns the previous setting (on by default)."""
    import dsmoe_runtime.session as session_module
    from dsmoe_runtime._library import set_huge_page_advice
    from dsmoe_export.exporter import export
    from dsmoe_export.synthetic import TinySpec, make_model_folder

    assert set_huge_page_advice(op_library, False) is True
    assert set_huge_page_advice(op_library, True) is False
    spec = TinySpec(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=1)
    path = tmp_path / "model.onnx"
    export(make_model_folder(tmp_path / "model", spec, seed=int(rng.integers(1 << 30))), path, progress=False)
    calls = []
    monkeypatch.setattr(session_module, "set_huge_page_advice",
                        lambda lib, on: calls.append((lib, on)) or set_huge_page_advice(lib, on))
    DSMoESession(path, threads=1, library=op_library, huge_pages=False)
    assert calls == []
    session = DSMoESession(path, threads=1, library=op_library)
    expected = [(session.library_path, False), (session.library_path, True)] if hp.available() else []
    assert calls == expected
    assert set_huge_page_advice(op_library, True) is True  # left on


# (each weight's first and last byte as MB into an aligned 8 MB region, MB of it touched, 2 MB
# pages the advice collapses): the pages one weight fills, and the pages of the weights' ends where
# they fill a quarter or more of the page together and the page is resident.
_ADVICE_CASES = {
    "ends": ([(1.5, 6.5)], 8, 4),           # both ends fill exactly a quarter of their pages: taken
    "short ends": ([(1.75, 6.25)], 8, 2),   # an eighth each: only the two pages the weight fills
    "cold tail": ([(1.5, 6.5)], 7, 3),      # the tail page half resident: collapsing would make it resident
    "inside one page": ([(2.25, 3.75)], 8, 1),
    "shared page": ([(0.25, 0.5), (0.5, 0.75), (2.0, 2.125)], 8, 1),  # 2 x an eighth in page 0: taken; 1/16 not
    "off": ([(1.5, 6.5)], 8, 0),            # DSMOE_HUGEPAGES=0
}


@pytest.mark.skipif(not _collapse_works(), reason="no transparent huge pages / MADV_COLLAPSE on this machine")
@pytest.mark.parametrize("case", list(_ADVICE_CASES))
def test_library_advice_takes_the_pages_weights_fill_and_their_resident_ends(op_library, rng, monkeypatch, case):
    """The op library's advice on one node's weights (DsmoeOpsAdviseHugePages: what its kernels apply
    to their constant weights at session creation), on memory laid out here: which 2 MB pages it
    collapses, the count it returns, the contents kept."""
    import ctypes

    weights, touched, pages = _ADVICE_CASES[case]
    if case == "off":
        monkeypatch.setenv("DSMOE_HUGEPAGES", "0")
    lib = ctypes.CDLL(op_library)
    lib.DsmoeOpsAdviseHugePages.restype = ctypes.c_int64
    lib.DsmoeOpsAdviseHugePages.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.c_int64]
    region = _Region(8 * MB)
    base, _ = region.aligned(8 * MB)
    offset = base - region.address
    data = rng.integers(0, 256, int(touched * MB), dtype=np.uint8)
    region.array[offset:offset + data.size] = data
    starts = (ctypes.c_void_p * len(weights))(*[base + int(first * MB) for first, _ in weights])
    sizes = (ctypes.c_size_t * len(weights))(*[int((last - first) * MB) for first, last in weights])
    assert lib.DsmoeOpsAdviseHugePages(None, sizes, len(weights)) == -1  # refused, nothing touched
    assert lib.DsmoeOpsAdviseHugePages(starts, sizes, len(weights)) == pages
    assert region.huge_bytes() == pages * 2 * MB
    np.testing.assert_array_equal(region.array[offset:offset + data.size], data)
