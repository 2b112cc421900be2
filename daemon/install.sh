#!/bin/sh
# Install modelfs on a host so that systemd/modelfs@.service runs as written:
#   /opt/modelfs/                 its own virtual environment with the package (not editable)
#   /usr/local/bin/modelfs        the command (the unit's ExecStart)
#   /sbin/mount.modelfs           the mount helper (`mount -t modelfs`, fstab, .mount units)
#   /etc/systemd/system/          modelfs@.service and the example mnt-models.mount (neither enabled)
#   /etc/modelfs/example.toml     the annotated configuration, to copy to /etc/modelfs/NAME.toml
# usage: daemon/install.sh install|uninstall        (root; DESTDIR=/some/root installs under that root)
#
# Idempotent: a second install upgrades the package in place. Every path created is recorded in
# /opt/modelfs/INSTALLED, and uninstall removes those (a config file only if it is unchanged) and nothing
# else. The commands are relative symlinks to launchers that find the venv from their own location, so a
# DESTDIR tree runs where it lies, and the same tree runs at / once copied there.
set -eu

ROOT=${DESTDIR:-}
SRC=$(cd "$(dirname "$0")/.." && pwd)
OPT=$ROOT/opt/modelfs
RECORD=$OPT/INSTALLED
PYTHON=${PYTHON:-python3}

note() { printf '%s\n' "$1" >> "$RECORD.new"; }

link() {  # link TARGET_RELATIVE PATH
    mkdir -p "$(dirname "$2")"
    ln -sfn "$1" "$2"
    note "${2#"$ROOT"}"
}

put() {  # put MODE SOURCE PATH
    install -D -m "$1" "$2" "$3"
    note "${3#"$ROOT"}"
}

launcher() {  # launcher NAME PYTHON-ARGS...: $OPT/libexec/NAME runs the venv's python with PYTHON-ARGS
    name=$1
    shift
    mkdir -p "$OPT/libexec"
    {
        echo '#!/bin/sh'
        echo '# modelfs launcher: the virtual environment is found from where this file lies.'
        echo 'here=$(dirname "$(readlink -f "$0")")'
        printf 'exec "$here/../bin/python" %s "$@"\n' "$*"
    } > "$OPT/libexec/$name"
    chmod 0755 "$OPT/libexec/$name"
}

install_all() {
    mkdir -p "$OPT"
    : > "$RECORD.new"
    [ -x "$OPT/bin/python" ] || "$PYTHON" -m venv "$OPT"
    rm -rf "$SRC/build"  # setuptools reuses build/lib: a stale one would ship modules the package left
    "$OPT/bin/python" -m pip install -q --disable-pip-version-check --no-warn-script-location --upgrade "$SRC"
    sh "$SRC/daemon/fuse3/build.sh" "$OPT"  # libfuse 3.17 + pyfuse3 with FUSE passthrough, inside $OPT
    launcher modelfs -m modelfs
    launcher mount.modelfs -c "'import sys; from modelfs.service.cli import mount_helper; sys.argv[0] = \"mount.modelfs\"; raise SystemExit(mount_helper())'"
    link ../../../opt/modelfs/libexec/modelfs "$ROOT/usr/local/bin/modelfs"
    link ../opt/modelfs/libexec/mount.modelfs "$ROOT/sbin/mount.modelfs"
    put 0644 "$SRC/systemd/modelfs@.service" "$ROOT/etc/systemd/system/modelfs@.service"
    put 0644 "$SRC/systemd/mnt-models.mount" "$ROOT/etc/systemd/system/mnt-models.mount"
    if [ ! -e "$ROOT/etc/modelfs/example.toml" ]; then
        put 0644 "$SRC/daemon/modelfs.toml" "$ROOT/etc/modelfs/example.toml"
    elif grep -qx /etc/modelfs/example.toml "$RECORD" 2>/dev/null; then
        note /etc/modelfs/example.toml  # ours from an earlier install: still ours
    fi
    cp "$SRC/daemon/modelfs.toml" "$OPT/example.toml.orig"  # to tell an unchanged example at uninstall
    mv "$RECORD.new" "$RECORD"
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    echo "modelfs installed under ${ROOT:-/}: $(cat "$RECORD" | tr '\n' ' ')"
}

uninstall_all() {
    if [ ! -f "$RECORD" ]; then
        echo "modelfs is not installed under ${ROOT:-/} (no $RECORD)" >&2
        exit 1
    fi
    while IFS= read -r path; do
        case $path in
            /etc/modelfs/example.toml)
                if cmp -s "$ROOT$path" "$OPT/example.toml.orig"; then rm -f "$ROOT$path"; else
                    echo "kept $path: it was changed since it was installed"; fi ;;
            *) rm -f "$ROOT$path" ;;
        esac
    done < "$RECORD"
    rmdir "$ROOT/etc/modelfs" 2>/dev/null || true
    rm -rf "$OPT"
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    echo "modelfs uninstalled from ${ROOT:-/}"
}

case ${1:-} in
    install) install_all ;;
    uninstall) uninstall_all ;;
    *) echo "usage: $0 install|uninstall   (DESTDIR=ROOT to use another root)" >&2; exit 2 ;;
esac
