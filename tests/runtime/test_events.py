"""Events serialize to one JSON object; a slow subscriber loses its oldest events and never blocks."""

import json
import threading

import pytest

from edge_mmm.runtime.events import EVENT_TYPES, Event, EventBus


def test_event_json_round_trip():
    e = Event("answer.delta", {"text": "héllo", "turn": 3}, t=12.5)
    assert json.loads(e.to_json()) == {"type": "answer.delta", "t": 12.5, "data": {"text": "héllo", "turn": 3}}
    assert set(EVENT_TYPES) >= {"transcript.partial", "transcript.final", "answer.delta", "answer.done", "timing",
                                "error", "notice"}
    with pytest.raises(ValueError, match="unknown event type"):
        Event("answer.chunk", {})


def test_slow_subscriber_drops_oldest_without_blocking():
    bus = EventBus()
    slow = bus.subscribe(maxsize=3)
    fast = bus.subscribe(maxsize=100)
    seen = []
    bus.add_listener(seen.append)
    done = threading.Event()

    def publish():
        for i in range(10):
            bus.publish("answer.delta", text=str(i), turn=1)
        done.set()

    threading.Thread(target=publish).start()
    assert done.wait(5), "publisher blocked on a full subscriber queue"
    assert [slow.get_nowait().data["text"] for _ in range(3)] == ["7", "8", "9"]
    assert fast.qsize() == 10 and len(seen) == 10
    assert bus.dropped == 7
    bus.unsubscribe(slow)
    bus.publish("notice", source="t", message="m")
    assert slow.empty() and fast.qsize() == 11


def test_events_before_the_first_subscriber_wait_for_it():
    """A microphone's error while the models load (nobody has subscribed yet) reaches the first subscriber,
    the newest `maxsize` of them; later subscribers see only what comes after they subscribe."""
    bus = EventBus(maxsize=4)
    for i in range(6):
        bus.publish("error", source="microphone", message=str(i))
    first = bus.subscribe(maxsize=3)
    assert [first.get_nowait().data["message"] for _ in range(3)] == ["3", "4", "5"] and first.empty()
    second = bus.subscribe()
    bus.publish("notice", source="t", message="after")
    assert first.get_nowait().data["message"] == "after" and second.qsize() == 1
