#!/bin/sh
# FUSE passthrough for modelfs: pyfuse3 built with a small patch (FileInfo.backing_id, the capability at
# init, registering a backing file) against a libfuse >= 3.17, installed into VENV. Where the host has one
# (Debian 13 and later: libfuse3-dev >= 3.17, by pkg-config), it is used as it is. Elsewhere (Debian 12
# ships 3.14, which cannot negotiate passthrough; Debian 13's 3.17 binaries need a newer glibc, but its
# source builds here) libfuse 3.17 is built from Debian's source into VENV/fuse3, fetched from the Debian
# mirrors the host's apt is configured with (through apt's proxy, if it has one), then from Debian's own
# address; it lives beside the system library (its own soname, found through the extension's rpath), so
# nothing else on the host changes.
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
PYFUSE3=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PREFIX=$VENV/fuse3
if pkg-config --atleast-version=3.17 fuse3 2>/dev/null; then
	SYSTEM_FUSE=$(pkg-config --modversion fuse3)
	BUILD_ID=system-$SYSTEM_FUSE-$PYFUSE3-$(cat "$0" "$HERE/pyfuse3-passthrough.patch" | sha256sum | cut -c1-12)
else
	SYSTEM_FUSE=
	BUILD_ID=$LIBFUSE-$PYFUSE3-$(cat "$0" "$HERE/pyfuse3-passthrough.patch" | sha256sum | cut -c1-12)
fi
STAMP=$PREFIX/.built-$BUILD_ID
CACHE=${MODELFS_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelfs}/fuse3-$BUILD_ID

if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import pyfuse3; pyfuse3.passthrough_open" 2>/dev/null; then
	exit 0
fi
install_from_cache() {
	mkdir -p "$PREFIX" &&
	{ [ -n "$SYSTEM_FUSE" ] || cp -a "$CACHE/lib" "$PREFIX/"; } &&
	"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$CACHE"/pyfuse3-*.whl &&
	"$VENV/bin/python" -c "import pyfuse3; pyfuse3.passthrough_open" &&
	rm -f "$PREFIX"/.built-* && touch "$STAMP"
}
if [ -f "$CACHE/done" ] && install_from_cache; then
	exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# The Debian archives the host's apt reads from (one-line and deb822 sources; security archives hold no
# pool of this package), then Debian's own address.
debian_mirrors() {
	{
		cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
			awk '$1 == "deb" || $1 == "deb-src" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }'
		cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }'
		echo http://deb.debian.org/debian
	} | grep -v -e '-security' -e '^cdrom:' | sed 's,/*$,,' | awk '!seen[$0]++'
}
fetch() {  # URL FILE
	if command -v curl >/dev/null; then curl -fsSL --connect-timeout 20 -o "$2" "$1"
	else "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" "$1" "$2"; fi
}

if [ -n "$SYSTEM_FUSE" ]; then
	echo "building pyfuse3 $PYFUSE3 with FUSE passthrough against the host's libfuse $SYSTEM_FUSE into $VENV"
	PKGCONF=
	RPATH=
else
	echo "building libfuse $LIBFUSE and pyfuse3 $PYFUSE3 with FUSE passthrough into $VENV"
	# apt's proxy, where the host has one and the environment names none
	if [ -z "${http_proxy:-}" ] && command -v apt-config >/dev/null; then
		eval "$(apt-config shell APT_PROXY Acquire::http::Proxy 2>/dev/null)" || true
		[ -n "${APT_PROXY:-}" ] && [ "$APT_PROXY" != DIRECT ] && export http_proxy="$APT_PROXY"
	fi
	got=
	for mirror in $(debian_mirrors); do
		if fetch "$mirror/pool/main/f/fuse3/fuse3_$LIBFUSE.orig.tar.gz" fuse3.tar.gz 2>/dev/null &&
			echo "$LIBFUSE_SHA256  fuse3.tar.gz" | sha256sum -c --quiet - 2>/dev/null; then
			got=$mirror
			break
		fi
	done
	if [ -z "$got" ]; then
		echo "build.sh: fuse3_$LIBFUSE.orig.tar.gz not found (or not as expected) on any Debian mirror apt uses:" \
			"$(debian_mirrors | tr '\n' ' ')" >&2
		exit 1
	fi
	"$VENV/bin/python" -m pip install -q "meson==1.6.1" "ninja==1.11.1.4"
	tar xzf fuse3.tar.gz
	PATH="$VENV/bin:$PATH" meson setup "fuse-$LIBFUSE/build" "fuse-$LIBFUSE" --prefix="$PREFIX" --libdir=lib \
		--buildtype=release -Dutils=false -Dexamples=false -Dtests=false -Duseroot=false -Ddisable-mtab=true >/dev/null
	# PREFIX already lies under any DESTDIR of the caller (make install DESTDIR=...): not twice.
	PATH="$VENV/bin:$PATH" env -u DESTDIR ninja -C "fuse-$LIBFUSE/build" install >/dev/null
	PKGCONF=$PREFIX/lib/pkgconfig
	# The extension finds the library relative to itself (site-packages/pyfuse3 -> VENV/fuse3/lib), so a
	# tree staged under DESTDIR, or a venv moved, still loads it.
	RPATH='-Wl,-rpath,$ORIGIN/../../../../fuse3/lib'
fi

# Only pyfuse3 itself as source (the patch applies to it); its build dependencies (Cython, setuptools) as
# the wheels their projects publish, not compiled here.
"$VENV/bin/python" -m pip download -q --no-deps --no-binary pyfuse3 "pyfuse3==$PYFUSE3" -d .
echo "$PYFUSE3_SHA256  pyfuse3-$PYFUSE3.tar.gz" | sha256sum -c --quiet -
tar xzf "pyfuse3-$PYFUSE3.tar.gz"
(cd "pyfuse3-$PYFUSE3" && patch -s -p1 < "$HERE/pyfuse3-passthrough.patch")
PKG_CONFIG_PATH="$PKGCONF${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" LDFLAGS="$RPATH" \
	"$VENV/bin/python" -m pip wheel -q --no-deps --no-cache-dir -w "$WORK/wheel" "./pyfuse3-$PYFUSE3"
rm -rf "$CACHE.new" && mkdir -p "$CACHE.new"
[ -n "$SYSTEM_FUSE" ] || cp -a "$PREFIX/lib" "$CACHE.new/"
cp -a "$WORK"/wheel/pyfuse3-*.whl "$CACHE.new/"
touch "$CACHE.new/done"
rm -rf "$CACHE" && mv "$CACHE.new" "$CACHE"
install_from_cache
