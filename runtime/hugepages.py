"""Moves the memory a new session allocated onto 2 MB pages (Linux transparent huge pages).

A decode step streams every weight it uses once, so on 4 KB pages it takes a TLB miss per 4 KB
read. ONNX Runtime keeps each initializer (and each pre-packed MatMul weight) in an allocation
of its own, which glibc maps on 4 KB pages where transparent huge pages are `madvise` (the
common default): the op library's own advice (custom_ops/cpu/hugepages.h) reaches the sparse
ops' weights only, inside session creation. The kernel merges neighbouring anonymous mappings,
so the mappings a session's creation added span nearly all of its weights: advising those,
2 MB-aligned, covers what `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` would at process start
(docs/runtime.md has the measurements).

`MADV_COLLAPSE` (Linux 6.1+) copies the pages there and then; `NewMemory` pays that once, in a
background thread at idle priority after the session's creation. Only huge pages whose small
pages are almost all resident are collapsed, so memory the process reserved but never touched
(thread stacks, arena tails) stays unbacked. Advisory only: the contents do not change, and any
failure leaves the memory as it was.
"""
from __future__ import annotations

import mmap
import os
import sys

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
THP_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"


def _huge_page_size() -> int:
    """The kernel's PMD huge page: 2 MB with 4 KB pages (x86-64, most ARM64), larger elsewhere."""
    try:
        with open(THP_SIZE) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


HUGE_PAGE = _huge_page_size()
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
MIN_RESIDENT = 0.9          # a huge page with fewer of its small pages resident is reserve, not weights
ENV_VAR = "DSMOE_HUGEPAGES"  # "0" turns this off, as it does the op library's advice


def available() -> bool:
    """Linux with transparent huge pages `madvise` or `always`, and not turned off by $DSMOE_HUGEPAGES."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_VAR) == "0":
        return False
    try:
        with open(THP_ENABLED) as f:
            mode = f.read()
    except OSError:
        return False
    return "[madvise]" in mode or "[always]" in mode


def parse_maps(text: str) -> list[tuple[int, int]]:
    """(start, end) of the private, writable, anonymous mappings (heap included) of a
    /proc/PID/maps text."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[1] != "rw-p" or not (len(fields) == 5 or fields[5] == "[heap]"):
            continue
        start, _, end = fields[0].partition("-")
        out.append((int(start, 16), int(end, 16)))
    return out


def mappings() -> list[tuple[int, int]]:
    with open("/proc/self/maps") as f:
        return parse_maps(f.read())


def to_collapse(before: list[tuple[int, int]], after: list[tuple[int, int]],
                huge: int = HUGE_PAGE) -> list[tuple[int, int]]:
    """The huge-page-aligned part of each mapping in `after` that is new or changed since `before`
    (a mapping that grew, or that a new one merged into, now holds new memory)."""
    old = set(before)
    ranges = []
    for start, end in after:
        if (start, end) in old:
            continue
        first, last = (start + huge - 1) & ~(huge - 1), end & ~(huge - 1)
        if last > first:
            ranges.append((first, last))
    return ranges


class _Libc:
    def __init__(self):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        self.madvise, self.mincore = libc.madvise, libc.mincore
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.pages = ctypes.create_string_buffer(HUGE_PAGE // mmap.PAGESIZE)

    def mostly_resident(self, start: int) -> bool:
        """Whether the huge page at `start` has MIN_RESIDENT of its small pages in memory (a
        reserve the process never touched would become resident if collapsed)."""
        if self.mincore(start, HUGE_PAGE, self.pages) != 0:
            return False
        absent = self.pages.raw.count(0)
        return absent <= (1 - MIN_RESIDENT) * len(self.pages.raw)


def collapse(ranges: list[tuple[int, int]], progress=None) -> int:
    """MADV_HUGEPAGE on each run of mostly resident huge pages in `ranges`, then MADV_COLLAPSE a
    huge page at a time (so that a thread that runs this at idle priority gives way between
    pages); returns the bytes collapsed (0 where the kernel cannot: before 6.1 only the advice is
    left, for khugepaged to act on later). `progress(bytes)` is called after each page."""
    libc = _Libc()
    done = 0
    for start, end in ranges:
        resident = [page for page in range(start, end, HUGE_PAGE) if libc.mostly_resident(page)]
        for first, last in _runs(resident):
            if libc.madvise(first, last - first, MADV_HUGEPAGE) != 0:
                continue
            for page in range(first, last, HUGE_PAGE):
                if libc.madvise(page, HUGE_PAGE, MADV_COLLAPSE) != 0:
                    break  # no kernel support, or the memory went away: the rest of the run too
                done += HUGE_PAGE
                if progress is not None:
                    progress(done)
    return done


def _runs(pages: list[int], huge: int = HUGE_PAGE) -> list[tuple[int, int]]:
    """Consecutive huge pages as (start, end) runs: one advice per run, not one per page (each
    advised range becomes a mapping of its own)."""
    runs: list[list[int]] = []
    for page in pages:
        if runs and runs[-1][1] == page:
            runs[-1][1] = page + huge
        else:
            runs.append([page, page + huge])
    return [(a, b) for a, b in runs]


def _idle_priority() -> None:
    """This thread (Linux: scheduling is per thread) at SCHED_IDLE, else nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        except (AttributeError, OSError):
            pass


class NewMemory:
    """Notes the process's mappings when made; `collapse()` then backs what was allocated since
    (a session's creation) with huge pages, in a daemon thread at idle priority: the copy
    (~2.5 ms a huge page on a 2-core AMD EPYC VM, a second for a 600 MB model) takes CPU time only
    when the process's other threads leave some, as they do between requests, so creating a
    session costs no more and its first calls are not slowed. `bytes` is what has moved so far,
    `wait()` waits for the end (tests, benchmarks)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and available()
        self.bytes = 0
        self._thread = None
        try:
            self._before = mappings() if self.enabled else []
        except OSError:
            self.enabled = False

    def collapse(self) -> None:
        if not self.enabled:
            return
        try:
            ranges = to_collapse(self._before, mappings())
        except OSError:  # /proc unreadable: only an optimisation
            return
        if not ranges:
            return
        import threading

        def run():
            _idle_priority()
            try:
                collapse(ranges, progress=self._moved)
            except OSError:
                pass

        self._thread = threading.Thread(target=run, name="dsmoe-huge-pages", daemon=True)
        self._thread.start()

    def _moved(self, done: int) -> None:
        self.bytes = done

    def wait(self, timeout: float | None = None) -> bool:
        """True once the collapse is over (or there was none)."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True
