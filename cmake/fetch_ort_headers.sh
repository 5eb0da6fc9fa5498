#!/bin/sh
# Fetch the ONNX Runtime C/C++ API headers (the onnxruntime wheels ship none).
#
# Source: Debian trixie's libonnxruntime-dev 1.21.0+dfsg-1, downloaded by apt
# from the mirror this machine's apt sources already name (no host name is
# written here) and verified by apt against the Debian archive keyring, then
# checked once more against the header checksums pinned below.
#
# Usage: fetch_ort_headers.sh [CACHE_DIR]
#   CACHE_DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/dsmoe-export/ort-headers-1.21.0
# On success the last line on stdout is the include dir (holds onnxruntime_c_api.h).
# A cache whose checksums match is reused without touching the network.
set -eu

PKG=libonnxruntime-dev
PKG_VERSION=1.21.0+dfsg-1
SUITE=trixie
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# sha256 of the headers this project was built and tested with.
CHECKSUMS='7783e9664bdb0b1b36145b5c8587dd1bc9a399aa000edf2e3dd03003cafc6882  onnxruntime_c_api.h
b3b27d6a6fced0725e3f188379cca008b1d7a456997684756374d4b388f2cf05  onnxruntime_cxx_api.h
7f448e994c732eacd9e49900365fefa8f1ac998a6d6eb78e5f4aab1b8d9d8900  onnxruntime_cxx_inline.h'

CACHE_DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/dsmoe-export/ort-headers-1.21.0}

die() { echo "fetch_ort_headers: $*" >&2; exit 1; }
log() { echo "fetch_ort_headers: $*" >&2; }

verify() {  # verify DIR: the pinned headers are there with the pinned checksums
  [ -f "$1/onnxruntime_c_api.h" ] || return 1
  (cd "$1" && printf '%s\n' "$CHECKSUMS" | sha256sum --check --status -) 2>/dev/null
}

if verify "$CACHE_DIR"; then
  log "using cached headers in $CACHE_DIR"
  echo "$CACHE_DIR"
  exit 0
fi

for tool in apt-get dpkg sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: this fallback needs a Debian-like system. Set ORT_INCLUDE_DIR to the include dir of an onnxruntime release (it holds onnxruntime_c_api.h) instead."
done
[ -r "$KEYRING" ] || die "$KEYRING not readable (package debian-archive-keyring); cannot verify the download. Set ORT_INCLUDE_DIR instead."

# The first Debian archive URI of this machine's apt sources (deb822 .sources
# files first, then the one-line format); security mirrors carry no trixie suite.
mirror_uri() {
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    sed -n 's/^[[:space:]]*URIs:[[:space:]]*//p' "$f" | tr ' ' '\n'
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    # deb [options] URI suite components...
    sed -n 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' "$f"
  done
}
URI=$(mirror_uri | grep -v -e '-security' -e '^$' | head -n 1 || true)
[ -n "$URI" ] || die "no Debian mirror URI found in /etc/apt/sources.list{,.d/*}. Set ORT_INCLUDE_DIR instead."

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dsmoe-ort-headers.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/deb"
cat > "$WORK/trixie.sources" <<SRC
Types: deb
URIs: $URI
Suites: $SUITE
Components: main
Signed-By: $KEYRING
SRC

# An apt of its own: own source list, lists and cache, nothing of the system's
# apt state is read or written; signatures are checked as usual.
APT_OPTS="-o Dir::Etc::SourceList=$WORK/trixie.sources -o Dir::Etc::SourceParts=/dev/null
  -o Dir::State::Lists=$WORK/lists -o Dir::Cache=$WORK/cache
  -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
  -o APT::Sandbox::User=$(id -un)"

log "downloading $PKG=$PKG_VERSION from $URI ($SUITE)"
# shellcheck disable=SC2086
apt-get $APT_OPTS -q update >&2 || die "apt-get update against $URI $SUITE failed (no network or no mirror access?). Set ORT_INCLUDE_DIR instead."
# shellcheck disable=SC2086
(cd "$WORK/deb" && apt-get $APT_OPTS -q download "$PKG=$PKG_VERSION" >&2) \
  || die "apt-get download $PKG=$PKG_VERSION failed. Set ORT_INCLUDE_DIR instead."
dpkg -x "$WORK"/deb/*.deb "$WORK/x" || die "dpkg -x failed"

SRC_DIR="$WORK/x/usr/include/onnxruntime"
verify "$SRC_DIR" || die "checksum mismatch of the headers in $PKG $PKG_VERSION (expected the pinned sha256 values)"

# Install atomically so that a concurrent or interrupted run never leaves a
# half-filled cache behind.
mkdir -p "$(dirname "$CACHE_DIR")"
STAGE=$(mktemp -d "$(dirname "$CACHE_DIR")/.ort-headers.XXXXXX")
cp -R "$SRC_DIR"/. "$STAGE"/
rm -rf "$CACHE_DIR"
mv "$STAGE" "$CACHE_DIR" || verify "$CACHE_DIR" || die "cannot install headers into $CACHE_DIR"
chmod 755 "$CACHE_DIR"
log "headers installed in $CACHE_DIR"
echo "$CACHE_DIR"
