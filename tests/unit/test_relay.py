"""Host half of the strategies, driven line by line (the guest half runs in the VM tests)."""

from __future__ import annotations

from testbed.lab.relay import Relay


def relay(strategy: str) -> tuple[Relay, list[str], list[str]]:
    vmbus: list[str] = []
    get: list[str] = []
    r = Relay(vmbus.append, get.append, strategy=strategy)
    r.on_vmbus("HELLO version=v2 features=pause_resume rx=4")
    return r, vmbus, get


def test_negotiation_offers_pause_resume_only_for_that_strategy() -> None:
    r, vmbus, _ = relay("pause-resume")
    assert vmbus[-1] == "WELCOME features=pause_resume" and r.ic == "ready" and r.next_seq == 4
    r, vmbus, _ = relay("mask")
    assert vmbus[-1] == "WELCOME features=-"
    r = Relay(lambda s: None, lambda s: None, strategy="pause-resume")
    r.on_vmbus("HELLO version=v1 features=- rx=0")
    assert r.features == set()


def test_none_posts_then_rejects_after_the_channel_closes() -> None:
    r, vmbus, _ = relay("none")
    assert r.request_shutdown("a", "x")[0] == "posted"
    assert vmbus[-1].startswith("MSG seq=4 ") and "id=a" in vmbus[-1]
    r.on_vmbus("CLOSING")
    assert r.ic == "not-ready"
    decision, _ = r.request_shutdown("b", "x")
    assert decision == "rejected" and not any("id=b" in s for s in vmbus)
    r.on_vmbus("HELLO version=v2 features=pause_resume rx=5")
    assert r.ic == "ready" and r.request_shutdown("c", "x")[0] == "posted"


def test_pause_resume_queues_after_pause_response_and_flushes_on_resume() -> None:
    r, vmbus, _ = relay("pause-resume")
    r.on_vmbus("PAUSE")
    assert vmbus[-1] == "PAUSE_RESPONSE"
    assert r.request_shutdown("a", "x")[0] == "held"
    assert not any("id=a" in s for s in vmbus)
    r.on_vmbus("CLOSING")
    r.on_vmbus("HELLO version=v2 features=pause_resume rx=4")
    assert not any("id=a" in s for s in vmbus), "held until Resume"
    r.on_vmbus("RESUME")
    assert sum("id=a" in s for s in vmbus) == 1


def test_reoffer_without_the_feature_flushes_a_paused_queue() -> None:
    r, vmbus, _ = relay("pause-resume")
    r.on_vmbus("PAUSE")
    r.request_shutdown("a", "x")
    r.on_vmbus("HELLO version=v1 features=- rx=4")  # serviced into v1: no Resume will come
    assert sum("id=a" in s for s in vmbus) == 1 and not r.paused


def test_mask_is_acknowledged_and_holds_until_unmask() -> None:
    r, vmbus, get = relay("mask")
    r.on_get("MASK")
    assert get[-1] == "MASK_ACK" and r.masked
    assert r.request_shutdown("a", "x")[0] == "held"
    r.on_get("UNMASK")
    assert sum("id=a" in s for s in vmbus) == 1


def test_servicing_report_times() -> None:
    ticks = iter(range(100, 10_000, 100))
    r = Relay(lambda s: None, lambda s: None, clock=lambda: next(ticks))
    t0 = r.start_servicing(1, "v2", {"save_ms": 300})
    r.on_get("SVC_START id=1 t=555")
    r.on_get("SVC_DONE id=1 ok=1 image=v2 t=999")
    assert r.svc["request_ns"] == t0 < r.svc["start_ns"] < r.svc["done_ns"]
    assert r.svc["guest_start_us"] == 555 and r.svc["ok"] is True


def test_the_re_offer_is_the_first_offer_from_a_new_boot() -> None:
    """A late answer to SYNC (same boot id) after the servicing request is not a
    re-offer; the offer from the restarted paravisor is (found in CI: a cold boot's own
    HELLO and the SYNC's answer both arrived, the second after the race began)."""
    r = Relay(lambda s: None, lambda s: None, strategy="none")
    r.on_vmbus("HELLO version=v2 features=- rx=0 boot=aaaa")
    r.start_servicing(1, "v2", {})
    r.on_vmbus("HELLO version=v2 features=- rx=0 boot=aaaa")  # the same paravisor, answering SYNC
    assert "reoffer_ns" not in r.svc and r.svc["boot_before"] == "aaaa"
    r.on_vmbus("HELLO version=v2 features=- rx=0 boot=bbbb")
    assert r.svc["boot_after"] == "bbbb" and r.svc["reoffer_ns"] > r.svc["request_ns"] and r.hellos == 3
