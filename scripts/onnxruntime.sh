#!/usr/bin/env bash
# Installs the ONNX Runtime shared library the onnx model runtime loads
# (modelhost/runtime/onnx) into .cache/onnxruntime/lib/ from npm's onnxruntime-node
# package: the version github.com/yalue/onnxruntime_go v1.27.0 is made for (its C API
# headers are ONNX Runtime 1.24.1's). `npm pack` only downloads the tarball (no install
# scripts run); its sha256 is checked against the value below before anything is
# extracted. Idempotent: a second run with the library in place does nothing.
#
#   scripts/onnxruntime.sh [DEST]   (DEST default: .cache/onnxruntime)
set -euo pipefail

VERSION=1.24.1
SHA256=57181cf6e6e711b155c5b942d591fd63ded0b5de5c4922d51fd994e7f6ac2772
case "$(uname -m)" in
  x86_64|amd64) ARCH=x64 ;;
  aarch64|arm64) ARCH=arm64 ;;
  *) echo "onnxruntime: no ONNX Runtime build for $(uname -m) in onnxruntime-node" >&2; exit 1 ;;
esac
DEST=${1:-.cache/onnxruntime}
LIB="$DEST/lib/libonnxruntime.so.$VERSION"

if [ -f "$LIB" ]; then
  echo "onnxruntime: $LIB present"
  exit 0
fi
command -v npm >/dev/null || { echo "onnxruntime: npm is needed to fetch onnxruntime-node@$VERSION (apt-get install npm)" >&2; exit 1; }
mkdir -p "$DEST/lib"
TGZ="$DEST/onnxruntime-node-$VERSION.tgz"
if [ ! -f "$TGZ" ] || ! echo "$SHA256  $TGZ" | sha256sum -c --status; then
  rm -f "$TGZ"
  (cd "$DEST" && npm pack --silent "onnxruntime-node@$VERSION" >/dev/null)
fi
if ! echo "$SHA256  $TGZ" | sha256sum -c --status; then
  echo "onnxruntime: $TGZ: sha256 $(sha256sum "$TGZ" | cut -d' ' -f1), want $SHA256; refusing it" >&2
  rm -f "$TGZ"
  exit 1
fi
# The package ships one self-contained library per platform (it links only libc,
# libstdc++, libm, libgcc_s, libdl, librt, libpthread).
member="package/bin/napi-v6/linux/$ARCH/libonnxruntime.so.1"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$TGZ" -C "$tmp" "$member"
install -m 0644 "$tmp/$member" "$LIB.tmp"
mv "$LIB.tmp" "$LIB"
ln -sf "libonnxruntime.so.$VERSION" "$DEST/lib/libonnxruntime.so"
echo "onnxruntime: installed $LIB (onnxruntime-node@$VERSION, sha256 $SHA256)"
