#!/bin/sh
# FUSE passthrough for modelfs: libfuse 3.17 built from Debian's source into VENV/fuse3, and pyfuse3
# built against it with a small patch (FileInfo.backing_id, the capability at init, registering a
# backing file), installed into VENV. Debian 12 ships libfuse 3.14, which cannot negotiate passthrough;
# Debian 13's 3.17 binaries need a newer glibc, but its source builds here. The library lives beside the
# system one (its own soname, found through the extension's rpath), so nothing else on the host changes.
#
#   sh daemon/fuse3/build.sh VENV        (idempotent: does nothing when this version is installed)
#
# What it builds (the library and a relocatable pyfuse3 wheel) is kept under MODELFS_BUILD_CACHE
# (default ~/.cache/modelfs/fuse3-<version and patch hash>): another venv on the host installs from there.
set -eu
VENV=$(cd "$1" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
LIBFUSE=3.17.2
LIBFUSE_SHA256=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
LIBFUSE_URL=http://deb.debian.org/debian/pool/main/f/fuse3/fuse3_$LIBFUSE.orig.tar.gz
PYFUSE3=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PREFIX=$VENV/fuse3
BUILD_ID=$LIBFUSE-$PYFUSE3-$(cat "$0" "$HERE/pyfuse3-passthrough.patch" | sha256sum | cut -c1-12)
STAMP=$PREFIX/.built-$BUILD_ID
CACHE=${MODELFS_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelfs}/fuse3-$BUILD_ID

if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import pyfuse3; pyfuse3.passthrough_open" 2>/dev/null; then
	exit 0
fi
install_from_cache() {
	mkdir -p "$PREFIX" &&
	cp -a "$CACHE/lib" "$PREFIX/" &&
	"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$CACHE"/pyfuse3-*.whl &&
	"$VENV/bin/python" -c "import pyfuse3; pyfuse3.passthrough_open" &&
	rm -f "$PREFIX"/.built-* && touch "$STAMP"
}
if [ -f "$CACHE/done" ] && install_from_cache; then
	exit 0
fi
echo "building libfuse $LIBFUSE and pyfuse3 $PYFUSE3 with FUSE passthrough into $VENV"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" -m pip install -q "meson==1.6.1" "ninja==1.11.1.4"
cd "$WORK"
if command -v curl >/dev/null; then curl -fsSL -o fuse3.tar.gz "$LIBFUSE_URL"
else "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], 'fuse3.tar.gz')" "$LIBFUSE_URL"; fi
echo "$LIBFUSE_SHA256  fuse3.tar.gz" | sha256sum -c --quiet -
tar xzf fuse3.tar.gz
PATH="$VENV/bin:$PATH" meson setup "fuse-$LIBFUSE/build" "fuse-$LIBFUSE" --prefix="$PREFIX" --libdir=lib \
	--buildtype=release -Dutils=false -Dexamples=false -Dtests=false -Duseroot=false -Ddisable-mtab=true >/dev/null
# PREFIX already lies under any DESTDIR of the caller (make install DESTDIR=...): not twice.
PATH="$VENV/bin:$PATH" env -u DESTDIR ninja -C "fuse-$LIBFUSE/build" install >/dev/null

"$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "pyfuse3==$PYFUSE3" -d .
echo "$PYFUSE3_SHA256  pyfuse3-$PYFUSE3.tar.gz" | sha256sum -c --quiet -
tar xzf "pyfuse3-$PYFUSE3.tar.gz"
(cd "pyfuse3-$PYFUSE3" && patch -s -p1 < "$HERE/pyfuse3-passthrough.patch")
# The extension finds the library relative to itself (site-packages/pyfuse3 -> VENV/fuse3/lib), so a
# tree staged under DESTDIR, or a venv moved, still loads it.
PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig" LDFLAGS='-Wl,-rpath,$ORIGIN/../../../../fuse3/lib' \
	"$VENV/bin/python" -m pip wheel -q --no-deps --no-cache-dir -w "$WORK/wheel" "./pyfuse3-$PYFUSE3"
rm -rf "$CACHE.new" && mkdir -p "$CACHE.new"
cp -a "$PREFIX/lib" "$WORK"/wheel/pyfuse3-*.whl "$CACHE.new/"
touch "$CACHE.new/done"
rm -rf "$CACHE" && mv "$CACHE.new" "$CACHE"
install_from_cache
