"""The per-transfer state machines and the transfer table, without any transport."""

from __future__ import annotations

import asyncio

import pytest

from kv_transfer import (
    Destination,
    KVLayout,
    KVPoolDescriptor,
    KVReceiver,
    KVSender,
    TransferError,
    TransferFailed,
    TransferState,
    TransferTable,
    TransferTimeout,
)

S = TransferState
LAYOUT = KVLayout("tiny-llama", "float32", page_size=4, num_layers=2, num_kv_heads=2, head_dim=8)
POOL = KVPoolDescriptor(LAYOUT, (0x1000, 0x2000), (0x3000, 0x4000), num_pages=16)
TID = 0x1234_5678_9ABC


def destination(transfer_id: int = TID) -> Destination:
    return Destination(
        request_id="req-1",
        transfer_id=transfer_id,
        decode_endpoint="127.0.0.1:50051",
        session_id="127.0.0.1:15000",
        page_ids=(0, 1, 2, 7),
        pool=POOL,
    )


# --- sender ---------------------------------------------------------------------------------


def test_sender_happy_path() -> None:
    sender = KVSender(TID)
    assert sender.state is S.BOOTSTRAPPING and sender.failure is None
    sender.attach(destination())
    assert sender.state is S.WAITING_FOR_INPUT
    sender.begin()
    assert sender.state is S.TRANSFERRING
    sender.succeed()
    assert sender.state is S.SUCCESS and sender.failure is None


def test_sender_attach_before_wait() -> None:
    async def main() -> Destination:
        sender = KVSender(TID)
        sender.attach(destination())
        return await sender.wait_for_destination(timeout_s=1.0)

    assert asyncio.run(main()) == destination()


def test_sender_wait_before_attach() -> None:
    async def main() -> tuple[Destination, TransferState]:
        sender = KVSender(TID)
        waiter = asyncio.create_task(sender.wait_for_destination(timeout_s=5.0))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        sender.attach(destination())
        return await waiter, sender.state

    dest, state = asyncio.run(main())
    assert dest == destination() and state is S.WAITING_FOR_INPUT


def test_sender_illegal_transitions() -> None:
    sender = KVSender(TID)
    with pytest.raises(ValueError, match="illegal transition from bootstrapping to transferring"):
        sender.begin()
    with pytest.raises(ValueError, match="illegal transition from bootstrapping to success"):
        sender.succeed()
    sender.attach(destination())
    with pytest.raises(ValueError, match="attach in state waiting_for_input"):
        sender.attach(destination())
    with pytest.raises(ValueError, match="illegal transition from waiting_for_input to success"):
        sender.succeed()
    sender.begin()
    sender.succeed()
    with pytest.raises(ValueError, match="illegal transition from success to failed"):
        sender.fail("too late")
    with pytest.raises(ValueError, match="illegal transition from success to transferring"):
        sender.begin()


def test_sender_rejects_another_transfers_destination() -> None:
    with pytest.raises(ValueError, match="destination of transfer 7 attached to transfer"):
        KVSender(TID).attach(destination(transfer_id=7))


def test_sender_times_out_bootstrapping() -> None:
    sender = KVSender(TID)
    with pytest.raises(TransferTimeout) as info:
        asyncio.run(sender.wait_for_destination(timeout_s=0.05))
    assert sender.state is S.FAILED and sender.failure is info.value
    assert str(info.value) == f"transfer {TID} timed out after 0.05 s in state bootstrapping"
    assert info.value.state is S.BOOTSTRAPPING and info.value.timeout_s == 0.05
    with pytest.raises(ValueError, match="attach in state failed"):
        sender.attach(destination())  # a late destination is refused


@pytest.mark.parametrize("state", [S.WAITING_FOR_INPUT, S.TRANSFERRING])
def test_sender_times_out_later_waiting_states(state: TransferState) -> None:
    sender = KVSender(TID)
    sender.attach(destination())
    if state is S.TRANSFERRING:
        sender.begin()
    with pytest.raises(TransferTimeout, match=f"in state {state.value}"):
        asyncio.run(sender.wait(timeout_s=0.05))
    assert sender.state is S.FAILED


def test_sender_wait_returns_on_success() -> None:
    async def main() -> None:
        sender = KVSender(TID)
        waiter = asyncio.create_task(sender.wait(timeout_s=5.0))
        sender.attach(destination())
        await asyncio.sleep(0)
        sender.begin()
        await asyncio.sleep(0)
        sender.succeed()
        await waiter

    asyncio.run(main())


def test_fail_wakes_every_sender_waiter() -> None:
    async def main() -> list[BaseException | Destination | None]:
        sender = KVSender(TID)
        waiters = [
            asyncio.create_task(sender.wait_for_destination(timeout_s=5.0)),
            asyncio.create_task(sender.wait(timeout_s=5.0)),
        ]
        await asyncio.sleep(0.01)
        sender.fail("prefill aborted")
        sender.fail("second reason is ignored")
        return await asyncio.gather(*waiters, return_exceptions=True)

    results = asyncio.run(main())
    for result in results:
        assert isinstance(result, TransferFailed)
        assert str(result) == f"transfer {TID} failed in state bootstrapping: prefill aborted"


def test_wait_on_failed_sender_raises_at_once() -> None:
    sender = KVSender(TID)
    sender.fail("decode worker gone")
    with pytest.raises(TransferFailed, match="decode worker gone"):
        asyncio.run(sender.wait_for_destination(timeout_s=5.0))


# --- receiver -------------------------------------------------------------------------------


def test_receiver_happy_path_complete_before_wait() -> None:
    receiver = KVReceiver(TID)
    receiver.bootstrapped()
    assert receiver.state is S.WAITING_FOR_INPUT
    receiver.complete({"first_token": 42})
    assert receiver.state is S.SUCCESS
    assert asyncio.run(receiver.wait(timeout_s=1.0)) == {"first_token": 42}


def test_receiver_wait_before_complete() -> None:
    async def main() -> object:
        receiver = KVReceiver(TID)
        waiter = asyncio.create_task(receiver.wait(timeout_s=5.0))
        await asyncio.sleep(0.01)
        receiver.bootstrapped()
        await asyncio.sleep(0.01)
        assert not waiter.done()
        receiver.complete(7)
        return await waiter

    assert asyncio.run(main()) == 7


def test_receiver_illegal_transitions() -> None:
    receiver = KVReceiver(TID)
    with pytest.raises(ValueError, match="illegal transition from bootstrapping to success"):
        receiver.complete(1)
    receiver.bootstrapped()
    with pytest.raises(ValueError, match="from waiting_for_input to waiting_for_input"):
        receiver.bootstrapped()
    receiver.complete(1)
    with pytest.raises(ValueError, match="illegal transition from success to success"):
        receiver.complete(2)


@pytest.mark.parametrize("state", [S.BOOTSTRAPPING, S.WAITING_FOR_INPUT])
def test_receiver_times_out_in_each_waiting_state(state: TransferState) -> None:
    receiver = KVReceiver(TID)
    if state is S.WAITING_FOR_INPUT:
        receiver.bootstrapped()
    with pytest.raises(TransferTimeout) as info:
        asyncio.run(receiver.wait(timeout_s=0.05))
    assert str(info.value) == f"transfer {TID} timed out after 0.05 s in state {state.value}"
    assert receiver.state is S.FAILED and isinstance(receiver.failure, TransferTimeout)
    with pytest.raises(ValueError, match="illegal transition from failed to success"):
        receiver.complete(1)  # a completion after the timeout is refused


def test_receiver_timeout_spans_both_waiting_states() -> None:
    """The timeout bounds the whole wait, not each state separately."""

    async def main() -> None:
        receiver = KVReceiver(TID)
        asyncio.get_running_loop().call_later(0.03, receiver.bootstrapped)
        await receiver.wait(timeout_s=0.06)

    with pytest.raises(TransferTimeout, match="in state waiting_for_input"):
        asyncio.run(main())


def test_fail_wakes_receiver_waiter() -> None:
    async def main() -> None:
        receiver = KVReceiver(TID)
        receiver.bootstrapped()
        asyncio.get_running_loop().call_later(0.01, receiver.fail, "write failed with code -1")
        await receiver.wait(timeout_s=5.0)

    with pytest.raises(TransferFailed) as info:
        asyncio.run(main())
    assert "failed in state waiting_for_input: write failed with code -1" in str(info.value)
    assert isinstance(info.value, TransferError) and isinstance(info.value, RuntimeError)


# --- destination and table ------------------------------------------------------------------


def test_destination_validation() -> None:
    with pytest.raises(ValueError, match="page 16 is outside the pool of 16 pages"):
        Destination("r", 1, "e", "s", (0, 16), POOL)
    with pytest.raises(ValueError, match="named twice"):
        Destination("r", 1, "e", "s", (3, 3), POOL)
    with pytest.raises(ValueError, match=r"transfer_id must be in \[0, 2\*\*63\)"):
        Destination("r", 2**63, "e", "s", (0,), POOL)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_table_get_or_create_pop() -> None:
    table: TransferTable[KVSender] = TransferTable()
    sender = table.get_or_create(1, lambda: KVSender(1))
    assert table.get_or_create(1, lambda: KVSender(99)) is sender  # the second caller finds it
    assert 1 in table and 2 not in table and len(table) == 1
    assert table.get(1) is sender and table.get(2) is None
    assert table.pop(1) is sender and table.pop(1) is None
    assert len(table) == 0


def test_table_expiry_with_fake_clock() -> None:
    clock = FakeClock()
    table: TransferTable[KVReceiver] = TransferTable(clock=clock)
    old = table.get_or_create(1, lambda: KVReceiver(1))
    clock.now = 105.0
    young = table.get_or_create(2, lambda: KVReceiver(2))
    assert table.expire(clock.now, max_age_s=10.0) == []
    clock.now = 112.0  # entry 1 is 12 s old, entry 2 is 7 s old
    assert table.expire(table.clock(), max_age_s=10.0) == [old]
    assert 1 not in table and table.get(2) is young
    assert table.expire(200.0, max_age_s=10.0) == [young]
    assert len(table) == 0
