"""The embedded cluster's in-process links: ordered, never re-entrant, closed on both ends."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from protocol import messages as m
from remap.local import LocalLink


class Recorder:
    """A handler that records what arrives and answers every heartbeat once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.got: list[m.Message] = []
        self.lost: list[Any] = []
        self.depth = 0
        self.max_depth = 0

    def message_received(self, link: LocalLink, msg: m.Message) -> None:
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)
        self.got.append(msg)
        if isinstance(msg, m.Heartbeat) and msg.busy == 0:
            link.send(m.Heartbeat(busy=1))  # an answer sent from inside a delivery
        self.depth -= 1

    def connection_lost(self, link: LocalLink, error: Any) -> None:
        self.lost.append(error)


def pair(clock: Clock) -> tuple[LocalLink, LocalLink, Recorder, Recorder]:
    a_handler, b_handler = Recorder("a"), Recorder("b")
    a = LocalLink(clock, "b", a_handler, 1 << 20)
    b = LocalLink(clock, "a", b_handler, 1 << 20)
    a.other, b.other = b, a
    return a, b, a_handler, b_handler


def test_messages_arrive_in_order_on_a_later_turn() -> None:
    """Nothing is delivered inside send(); on the next turn everything arrives in send order."""
    clock = Clock()
    a, _b, _ha, hb = pair(clock)
    for i in range(5):
        a.send(m.StatusRequest(id=i))
    assert hb.got == [], "delivery must not happen inside send"
    clock.advance(0)
    assert [msg.id for msg in hb.got] == [0, 1, 2, 3, 4]


def test_answers_sent_during_delivery_do_not_re_enter_the_handler() -> None:
    """A handler that sends while handling is never called again before it returns."""
    clock = Clock()
    a, b, ha, hb = pair(clock)
    a.send(m.Heartbeat(busy=0))
    b.send(m.Heartbeat(busy=0))
    for _ in range(3):
        clock.advance(0)
    assert ha.max_depth == 1 and hb.max_depth == 1
    assert [h.busy for h in hb.got] == [0, 1] and [h.busy for h in ha.got] == [0, 1]


def test_close_tells_both_ends_and_drops_later_sends() -> None:
    """close() on one end: both handlers hear connection_lost once; later sends go nowhere."""
    clock = Clock()
    a, b, ha, hb = pair(clock)
    a.send(m.StatusRequest(id=1))
    b.close()
    a.send(m.StatusRequest(id=2))
    clock.advance(0)
    assert len(ha.lost) == 1 and len(hb.lost) == 1
    assert hb.got == [], "messages queued to a closed end are not delivered"
    assert not a.open and not b.open


def test_a_chain_of_hops_is_delivered_on_one_turn() -> None:
    """A message and the answers its handler sends are all delivered on the same reactor turn
    (the embedded cluster's console → server → node path), still never inside send()."""
    clock = Clock()
    turns: list[float] = []
    call_later = clock.callLater

    def counted(delay: float, fn: Any, *args: Any) -> Any:
        turns.append(delay)
        return call_later(delay, fn, *args)

    clock.callLater = counted  # type: ignore[method-assign]
    a, b, ha, hb = pair(clock)
    a.send(m.Heartbeat(busy=0))  # b answers with busy=1 from inside its delivery
    assert hb.got == []
    clock.advance(0)
    assert [h.busy for h in hb.got] == [0] and [h.busy for h in ha.got] == [1]
    assert ha.max_depth == 1 and hb.max_depth == 1
    assert turns == [0], "the answer took a reactor turn of its own"


def test_in_one_turn_delivers_what_a_booked_turn_waited_for_and_cancels_it() -> None:
    """What was sent before (a turn booked for it) goes when ``in_one_turn``'s call returns,
    answers included; the booked turn is cancelled, never taken."""
    from remap.local import in_one_turn

    clock = Clock()
    a, b, ha, hb = pair(clock)
    a.send(m.Heartbeat(busy=0))  # b answers from inside the delivery: same run, no new turn
    assert clock.getDelayedCalls(), "a turn is booked"
    in_one_turn(clock)(lambda: None)
    assert [type(x) for x in hb.got] == [m.Heartbeat]
    assert [type(x) for x in ha.got] == [m.Heartbeat]
    assert clock.getDelayedCalls() == [], "the booked turn was cancelled"
    in_one_turn(clock)(lambda: None)  # nothing waits: nothing happens
    clock.advance(0)
    assert len(hb.got) == 1 and len(ha.got) == 1


def test_a_core_answer_is_handed_on_in_the_turn_that_read_it() -> None:
    """The node hands the answers it read from a core's pipe to the pool inside ``read_turn``
    (the embedded cluster's :func:`in_one_turn`: what they send goes on when it returns)."""
    from protocol.framing import encode_frame
    from remap.node.cores import OUT_FD, CoreProcess

    calls: list[str] = []

    def turn(handle: Any, frames: Any) -> None:
        calls.append("turn")
        handle(frames)
        calls.append("turn ends")

    class Pool:
        read_turn = staticmethod(turn)

        def _core_message(self, core: Any, msg: m.Message, frame: Any = None) -> None:
            calls.append(type(msg).__name__)

    core = CoreProcess(Pool(), 0)  # type: ignore[arg-type]
    try:
        frames = [b"".join(encode_frame(*m.encode(m.CoreReady(pid=i)))) for i in (1, 2)]
        core.childDataReceived(OUT_FD, b"".join(frames))
        assert calls == ["turn", "CoreReady", "CoreReady", "turn ends"]
    finally:
        core.shm.close()
        import os

        os.close(core.shm_fd)


def test_a_handler_error_during_in_one_turn_is_logged_not_raised() -> None:
    """``in_one_turn`` runs inside a core's pipe reader: an error there would look like a
    broken pipe. It is logged (as the reactor logs a failed turn) and what follows arrives."""
    from twisted.logger import globalLogPublisher

    from remap.local import in_one_turn

    clock = Clock()
    a, b, ha, hb = pair(clock)

    class Broken(Recorder):
        def message_received(self, link: LocalLink, msg: m.Message) -> None:
            super().message_received(link, msg)
            if isinstance(msg, m.StatusRequest) and msg.id == 0:
                raise RuntimeError("a bug in a handler")

    b.handler = Broken("b")
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        a.send(m.StatusRequest(id=0))
        a.send(m.StatusRequest(id=1))
        in_one_turn(clock)(lambda: None)  # does not raise
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert any("in-process message failed" in str(e.get("log_format")) for e in logged)
    clock.advance(0)
    assert [x.id for x in b.handler.got] == [0, 1]


def test_a_call_from_another_thread_is_delivered_when_it_returns_without_a_timed_call() -> None:
    """``in_one_turn`` (how the embedded cluster runs a caller's calls): what the call sends
    is delivered, hops included, when it returns; no timed call is booked for it meanwhile
    (a submit booked one, and Twisted's timed-call machinery ran it, ~9 Python calls)."""
    from remap.local import in_one_turn

    clock = Clock()
    a, b, ha, hb = pair(clock)
    booked: list[int] = []

    def call() -> None:
        a.send(m.Heartbeat(busy=0))  # b answers from inside the delivery
        a.send(m.StatusRequest(id=7))
        booked.append(len(clock.getDelayedCalls()))
        assert hb.got == [], "delivered inside send"

    in_one_turn(clock)(call)
    assert booked == [0], "a timed call was booked"
    assert [type(x) for x in hb.got] == [m.Heartbeat, m.StatusRequest]
    assert [type(x) for x in ha.got] == [m.Heartbeat]
    assert ha.max_depth == 1 and hb.max_depth == 1
    assert clock.getDelayedCalls() == []


def test_in_one_turn_inside_a_delivery_leaves_it_to_the_running_loop() -> None:
    """Run from a handler (not the top of a turn), the call's messages wait for the loop that
    is delivering: nothing is re-entered."""
    from remap.local import in_one_turn

    clock = Clock()
    a, b, ha, hb = pair(clock)
    run = in_one_turn(clock)

    class Nested(Recorder):
        def message_received(self, link: LocalLink, msg: m.Message) -> None:
            super().message_received(link, msg)
            run(link.send, m.StatusRequest(id=1))
            assert ha.got == []

    b.handler = Nested("b")
    a.send(m.Heartbeat(busy=1))
    clock.advance(0)
    assert [type(x) for x in ha.got] == [m.StatusRequest] and ha.max_depth == 1
