"""One line per check, the way the GPU scripts report: "ok   ..." or "FAIL ...". An exception
fails its own item only (its first line is printed), so one broken model or kernel does not
hide the results of the others."""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

Item = TypeVar("Item")


def run_checks(items: Iterable[Item], check: Callable[[Item], tuple[bool, str]],
               name: Callable[[Item], str] = str) -> int:
    """check(item) -> (ok, line) for each item, printed as it finishes; 0 when all pass, else 1."""
    ok_all = True
    for item in items:
        try:
            ok, line = check(item)
        except Exception as ex:  # noqa: BLE001 (one line per item, the others still run)
            first = (str(ex).splitlines() or [""])[0][:300]
            ok, line = False, f"{name(item)}: {type(ex).__name__}: {first}"
        ok_all &= ok
        print(("ok   " if ok else "FAIL ") + line, flush=True)
    return 0 if ok_all else 1
