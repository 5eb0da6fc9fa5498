#!/bin/sh
# Fetch the CUTLASS / CuTe C++ headers (the Hopper grouped GEMMs of custom_ops/cuda/
# grouped_gemm_sm90.cu) from PyPI: the nvidia-cutlass wheel, pinned by version and
# sha256, ships them under cutlass_library/source/include. Downloaded with pip, so
# the machine's index configuration applies; nothing of the wheel but the headers
# is kept, and nothing is installed.
#
# Usage: fetch_cutlass_headers.sh [CACHE_DIR]
#   CACHE_DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/dsmoe-export/cutlass-4.2.0.0
#   PYTHON    interpreter whose pip downloads the wheel (default: python3)
# On success the last line on stdout is the include dir (holds cutlass/cutlass.h).
set -eu

VERSION=4.2.0.0
WHEEL=nvidia_cutlass-$VERSION-py3-none-any.whl
WHEEL_SHA256=f9599ada45c7bcb6bf53f7d3f0a7d154183e53451c01bfa59eecd37dd4a693f6
CACHE_DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/dsmoe-export/cutlass-$VERSION}
PYTHON=${PYTHON:-python3}

die() { echo "fetch_cutlass_headers: $*" >&2; exit 1; }
log() { echo "fetch_cutlass_headers: $*" >&2; }

# The cache is complete once the marker naming the wheel's checksum is there (written last).
if [ -f "$CACHE_DIR/include/cutlass/cutlass.h" ] && [ "$(cat "$CACHE_DIR/SHA256" 2>/dev/null)" = "$WHEEL_SHA256" ]; then
  log "using cached headers in $CACHE_DIR/include"
  echo "$CACHE_DIR/include"
  exit 0
fi

"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not run; set PYTHON, or CUTLASS_INCLUDE_DIR to a CUTLASS $VERSION include dir"
command -v sha256sum >/dev/null 2>&1 || die "'sha256sum' not found"
mkdir -p "$(dirname "$CACHE_DIR")"
work=$(mktemp -d "$(dirname "$CACHE_DIR")/.cutlass.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "downloading nvidia-cutlass==$VERSION with $PYTHON -m pip"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "nvidia-cutlass==$VERSION" >&2 \
  || die "pip could not download nvidia-cutlass==$VERSION"
[ -f "$work/$WHEEL" ] || die "pip did not produce $WHEEL"
echo "$WHEEL_SHA256  $work/$WHEEL" | sha256sum --check --status - || die "$WHEEL: sha256 mismatch (expected $WHEEL_SHA256)"
"$PYTHON" - "$work/$WHEEL" "$work/x" <<'PY' || die "could not unpack the headers from $WHEEL"
import sys, zipfile
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit("no " + prefix + " in the wheel")
    z.extractall(sys.argv[2], names)
PY
rm -rf "$CACHE_DIR"
mkdir -p "$CACHE_DIR"
mv "$work/x/cutlass_library/source/include" "$CACHE_DIR/include"
echo "$WHEEL_SHA256" > "$CACHE_DIR/SHA256"
log "headers in $CACHE_DIR/include"
echo "$CACHE_DIR/include"
