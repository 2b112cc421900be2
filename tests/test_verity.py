"""fs-verity under a real mount, in a VM: this machine's kernel has no fs-verity, so `tests/verity_guest.py`
runs under a stock kernel that has it (qemu, software emulation), with the cache on an ext4 made with
`-O verity` on a blank disk image.

The VM takes minutes (emulated), so it is started in the background as soon as the test is collected
(`conftest.pytest_collection_finish`), at the lowest CPU and I/O priority, and the suite runs beside it; the
test waits for its result. Where no
VM can be started (no runner, no qemu, no kernel package reachable), the test is skipped with that reason,
printed; never silently.

The runner is `shared/verity-vm/run.sh` of the workplace (found in a directory above the checkout) or the
script named by MODELFS_VERITY_VM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from modelfs.service.mount import alive
from tests.conftest import requires_fuse

REPO = Path(__file__).resolve().parent.parent
#: A run that takes longer than this is hung (the bound only detects a hang; a run here takes ~4 minutes).
HANG = 1500.0


def runner() -> Path | None:
    named = os.environ.get("MODELFS_VERITY_VM")
    if named:
        return Path(named)
    for up in REPO.parents:
        candidate = up / "shared" / "verity-vm" / "run.sh"
        if candidate.exists():
            return candidate
    return None


class VerityVM:
    """One background run of the guest script in the VM; `result` waits for it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.output = ""
        self.why_not = ""
        self._done = threading.Event()
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        if self.proc is not None or self._done.is_set():
            return
        script = runner()
        if script is None:
            self.why_not = "no VM runner (shared/verity-vm/run.sh above the checkout, or MODELFS_VERITY_VM)"
        elif os.geteuid() != 0:
            self.why_not = "the VM runner needs root"
        if self.why_not:
            self._done.set()
            return
        self._dir = tempfile.TemporaryDirectory(prefix="modelfs-verity-")
        disk = Path(self._dir.name) / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(256 << 20)
        # At the lowest CPU and I/O priority: the emulated VM must not slow the suite's own tests, some of
        # which race faults against loads; it uses what they leave (the test waits for it at the end).
        self.proc = subprocess.Popen(
            ["nice", "-n", "19", "ionice", "-c", "3", "sh", str(script), "-d", str(disk), "--", sys.executable,
             "-m", "tests.verity_guest"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.proc is not None
        self.output = self.proc.communicate()[0]
        self._done.set()

    def result(self) -> dict[str, object]:
        self.start()
        if not self._done.wait(HANG):
            self.stop()
            raise AssertionError(f"the VM run did not end in {HANG:.0f} s (hung): {self.output[-2000:]}")
        if self.why_not:
            print(f"fs-verity VM test skipped: {self.why_not}")
            pytest.skip(self.why_not)
        lines = [ln for ln in self.output.splitlines() if ln.startswith("RESULT ")]
        if self.proc is not None and self.proc.returncode and not lines and "ended without running" in self.output:
            print(f"fs-verity VM test skipped: the VM could not start: {self.output.strip()[-500:]}")
            pytest.skip("the VM could not start (see the printed output)")
        assert lines, f"the guest printed no result (exit {self.proc and self.proc.returncode}): {self.output[-3000:]}"
        return dict(json.loads(lines[-1][len("RESULT "):]))

    def stop(self) -> None:
        """Kill the runner and its qemu (its own process group, by pid) and remove the disk image."""
        if self.proc is not None and self.proc.poll() is None and alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


VM = VerityVM()


@requires_fuse
def test_fs_verity_cache_files_are_checked_by_the_kernel_trusted_by_measure_and_healed() -> None:
    """Under a kernel with fs-verity, the cache on ext4 -O verity: a complete file is sealed with verity on
    (read-only from then on); a new daemon trusts it by FS_IOC_MEASURE_VERITY, reading nothing back, and serves
    it by passthrough; a block changed under the filesystem gives EIO through the mount, never the wrong bytes;
    the scrub finds it, the file is deleted and fetched again, and the next read is right."""
    try:
        r = VM.result()
    finally:
        VM.stop()
    assert r["storage"] == "fs-verity", r
    for phase in ("cold", "restart", "rotten", "healed"):
        assert r[phase]["wrong"] == [], (phase, r)  # type: ignore[index]
    assert r["cold"]["eio"] == [] and r["restart"]["eio"] == [] and r["healed"]["eio"] == [], r  # type: ignore[index]
    assert len(str(r["verity_digest"])) == 64 and r["writable"] == "EPERM", r
    assert r["restart_stats"] == {"files_trusted_sealed": 1, "extents_verified": 0, "passthrough_opens": 1,
                                  "storage_verifies": 1}, r
    rotten = r["rotten"]["eio"]  # type: ignore[index]
    assert rotten and all(3 << 20 <= o <= (3 << 20) + 777 for o in rotten), r  # the block that rotted, only
    print(f"fs-verity enable (emulated CPU, no KVM): {r['enable_s_per_gib']:.1f} s per GiB")
    assert r["healed_stats"]["scrub_damaged"] == 1 and r["healed_stats"]["corrupt_extents"] == 1, r  # type: ignore[index]
