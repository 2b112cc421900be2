"""Supervision, the fault hook and the push gate without a mount (the mount tests: test_supervision.py)."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from modelfs.faults import Faults, InjectedFault
from modelfs.reads.push import CHUNK, PushGate
from modelfs.stats import Stats
from modelfs.supervise import Supervisor


def test_a_failing_task_is_logged_counted_and_handed_to_its_error_handler(caplog: pytest.LogCaptureFixture) -> None:
    stats = Stats()
    handed: list[BaseException] = []
    survivor_ran = trio.Event()

    async def boom() -> None:
        raise KeyError("bug")

    async def survivor() -> None:
        await trio.sleep(0.01)
        survivor_ran.set()

    async def main() -> None:
        sup = Supervisor(stats)
        async with sup.running():
            sup.spawn(boom, name="boom", on_error=handed.append)
            sup.spawn(survivor, name="survivor")
            await survivor_ran.wait()  # the nursery was not cancelled by boom

    trio.run(main)
    assert stats.internal_errors == 1
    assert len(handed) == 1 and isinstance(handed[0], KeyError)
    assert "internal error in boom" in caplog.text and "Traceback" in caplog.text


def test_a_long_lived_loop_is_restarted_and_cancellation_still_ends_it() -> None:
    stats = Stats()
    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("transient bug")
        await trio.sleep_forever()

    async def main() -> None:
        sup = Supervisor(stats)
        async with sup.running() as nursery:
            sup.spawn(loop, name="loop", restart=True)
            while runs < 3:
                await trio.sleep(0.5)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert runs == 3 and stats.internal_errors == 2


def test_fault_hook_fires_once_per_entry_and_only_where_armed() -> None:
    faults = Faults("flight:model-00002,prefetch:")
    faults.check("flight", "ckpt/model-00001.safetensors")  # not armed for this key
    with pytest.raises(InjectedFault):
        faults.check("flight", "ckpt/model-00002.safetensors")
    faults.check("flight", "ckpt/model-00002.safetensors")  # disarmed
    with pytest.raises(InjectedFault):
        faults.check("prefetch", "anything")
    Faults("").check("flight", "x")
    with pytest.raises(ValueError, match="unknown fault site"):
        Faults("nowhere:x")


def test_push_gate_pushes_in_chunks_and_stops_between_them_once_closed() -> None:
    stats = Stats()
    pushed: list[tuple[int, int]] = []
    entered = threading.Event()
    go_on = threading.Event()
    hold_second = threading.Event()

    def push(inode: int, offset: int, data: memoryview) -> None:
        pushed.append((offset, len(data)))
        if hold_second.is_set() and len(pushed) == 2:  # this chunk waits in the "kernel" for the test
            entered.set()
            go_on.wait(10)

    gate = PushGate(push, stats, min_available=0)
    data = memoryview(bytearray(3 * CHUNK + 5))
    assert gate.push(7, 0, data[: CHUNK + 1], lambda _: True)
    assert pushed == [(0, CHUNK), (CHUNK, 1)] and stats.pushed_bytes == CHUNK + 1
    pushed.clear()
    hold_second.set()

    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(gate.push(7, 0, data, lambda _: True)))
    t.start()
    assert entered.wait(10)
    gate.close()
    assert gate.in_kernel == 1  # the chunk already in the kernel is let finish ...

    async def drained() -> bool:
        return await gate.drained(0.05)

    assert trio.run(drained) is False
    go_on.set()
    t.join(10)
    assert result == [False] and len(pushed) == 2  # ... and no further chunk went in
    assert trio.run(drained) is True and gate.in_kernel == 0
    assert not gate.push(7, 0, data, lambda _: True)  # closed for good


def test_push_gate_stops_when_the_file_is_released() -> None:
    open_files = {7}
    calls: list[int] = []

    def push(inode: int, offset: int, data: memoryview) -> None:
        calls.append(offset)
        open_files.clear()  # the last handle closes while the first chunk is in the kernel

    gate = PushGate(push, Stats(), min_available=0)
    assert not gate.push(7, 0, memoryview(bytearray(2 * CHUNK)), lambda inode: inode in open_files)
    assert calls == [0]


def test_a_cancelled_handler_still_answers_eio() -> None:
    """pyfuse3 replies only when a handler returns or raises FUSEError: a cancelled handler must raise
    FUSEError(EIO), or its request stays unanswered (and a push waiting on its page sleeps for good)."""
    import errno

    import pyfuse3

    from modelfs.fuse.fs import _errors

    entered = []

    @_errors
    async def handler() -> None:
        entered.append(True)
        await trio.sleep_forever()

    async def main() -> None:
        with pytest.raises(pyfuse3.FUSEError) as answered, trio.CancelScope() as scope:
            scope.cancel()  # the daemon is stopping: the handler's first checkpoint raises Cancelled
            await handler()
        assert answered.value.errno == errno.EIO and entered

    trio.run(main)
