"""`make install` into a temporary root (DESTDIR): the unit verifies against what was installed, with no
path rewritten; the installed commands run from there; a second install changes nothing; uninstall removes
what install made and nothing else."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALLED = {"/usr/local/bin/modelfs", "/sbin/mount.modelfs", "/etc/systemd/system/modelfs@.service",
             "/etc/systemd/system/mnt-models.mount", "/etc/modelfs/example.toml"}


def make(target: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(REPO), "-s", target, f"DESTDIR={root}"], capture_output=True,
                          text=True, timeout=900)


def tree(root: Path) -> set[str]:
    return {"/" + p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.install
def test_install_into_a_root_verify_run_reinstall_uninstall(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/someone-elses-tool").write_text("#!/bin/sh\n")
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/other.service").write_text("[Service]\nExecStart=/bin/true\n")
    # The root gets the host's own units (sysinit.target and the rest), as a real root has them.
    for units in ("usr/lib/systemd/system", "lib/systemd/system"):
        if (Path("/") / units / "sysinit.target").exists():
            shutil.copytree(Path("/") / units, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
            break
    before = tree(root)

    r = make("install", root)
    assert r.returncode == 0, r.stderr
    record = set((root / "opt/modelfs/INSTALLED").read_text().split())
    assert record == INSTALLED
    for path in INSTALLED:
        assert (root / path.lstrip("/")).exists(), path
    assert (root / "usr/local/bin/modelfs").is_symlink()
    shipped = {p.as_posix() for p in (root / "opt/modelfs").rglob("*.py") if "/site-packages/modelfs/" in p.as_posix()}
    assert shipped and not any("/tests/support/" in p for p in shipped), shipped  # helpers stay in the tree
    assert not Path((root / "usr/local/bin/modelfs").readlink()).is_absolute()  # runs where the tree lies

    # The unit exactly as shipped, resolved inside the root (ExecStart=/usr/local/bin/modelfs must exist there).
    unit = root / "etc/systemd/system/modelfs@.service"
    assert unit.read_text() == (REPO / "systemd/modelfs@.service").read_text()
    v = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "modelfs@models.service"],
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stderr

    out = subprocess.run([str(root / "usr/local/bin/modelfs"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "mount" in out.stdout, out.stderr
    helper = subprocess.run([str(root / "sbin/mount.modelfs")], capture_output=True, text=True, timeout=60)
    assert helper.returncode == 2 and "usage: mount.modelfs SOURCE MOUNTPOINT" in helper.stderr
    assert helper.stderr.count("\n") == 1

    installed = tree(root)
    again = make("install", root)  # idempotent: the same files, nothing added
    assert again.returncode == 0, again.stderr
    assert tree(root) == installed

    (root / "etc/modelfs/models.toml").write_text('source = "s3://bucket/models"\n')  # the operator's own
    r = make("uninstall", root)
    assert r.returncode == 0, r.stderr
    left = tree(root)
    assert before <= left  # nothing that was there before is gone
    assert left - before == {"/etc/modelfs/models.toml"}  # and only the operator's file is left of ours
    assert not (root / "opt/modelfs").exists()
