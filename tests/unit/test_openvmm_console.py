"""OpenVMM's console and log lines as they come through a terminal: ANSI colour, CRLF,
the prompt and the echo of typed commands, fields (u64 in hex, &str quoted)."""

from __future__ import annotations

import pytest

from testbed.backends.openvmm.console import clean, hex_or_int, parse
from testbed.backends.openvmm.hostside import Stamped

# A transcript as a pty shows it: the prompt, the typed echo, log lines in colour.
TRANSCRIPT = (
    "openvmm> service-vtl2\r\n"
    "openvmm> shutdown\r\n"
    "openvmm> \x1b[2m   5.123456789s\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mopenvmm_entry::repl\x1b[0m:  "
    "vtl2 servicing complete \x1b[3mduration\x1b[0m\x1b[2m=\x1b[0m1234\r\n"
    "   5.200000001s ERROR openvmm_entry::repl:  shutdown ic not ready\r\n"
    "   6.000000000s ERROR openvmm_entry::repl:  shutdown failed with error code 0x80004005\r\n"
    '   7.000000000s  INFO openvmm_entry::repl:  guest halted reason="PowerOff"\r\n'
    '   8.1s  INFO vm_controller{id=1}: openvmm_entry::vm_controller:  guest halted reason="TripleFault"\r\n'
    "   9.000000000s DEBUG openvmm_helpers::underhill:  waiting for guest to send saved state exit_code=0x7\r\n"
    "shutdown already in progress\r\n"
)


def lines() -> list[str]:
    s = Stamped("console")
    for i in range(0, len(TRANSCRIPT), 7):  # arrives in arbitrary pieces
        s.feed(TRANSCRIPT[i : i + 7], t_ns=i)
    return [ln for _t, ln in s.since(0)]


def test_a_transcript_splits_into_events_with_fields() -> None:
    parsed = [parse(ln) for ln in lines()]
    events = [p.event for p in parsed]
    assert events == [None, None, "servicing-complete", "ic-not-ready", "shutdown-failed", "guest-halted",
                      "guest-halted", "phase:save-wait", "already-in-progress"]  # fmt: skip
    assert [p.text for p in parsed[:2]] == ["service-vtl2", "shutdown"]  # the echo, prompt removed
    done = parsed[2]
    assert (done.level, done.target, done.uptime_s, done.fields) == ("INFO", "openvmm_entry::repl", 5.123456789,
                                                                     {"duration": "1234"})  # fmt: skip
    assert done.message == "vtl2 servicing complete"
    assert parsed[5].fields["reason"] == "PowerOff" and parsed[6].fields["reason"] == "TripleFault"
    assert parsed[6].target == "openvmm_entry::vm_controller"
    assert (
        hex_or_int(parsed[7].fields["exit_code"]) == 7
        and hex_or_int(parsed[4].message.split()[-1]) == 0x80004005
    )


def test_a_lone_prompt_is_a_line_at_once() -> None:
    s = Stamped("console")
    s.feed("openvmm> ", t_ns=5)
    assert s.since(0) == [(5, "openvmm> ")] and clean("openvmm> ") == ""


@pytest.mark.parametrize("raw", ["\x1b[?25l\x1b[1Gopenvmm> \x1b[K", "\x1b]0;openvmm\x07openvmm> "])
def test_cursor_and_title_escapes_are_removed(raw: str) -> None:
    assert clean(raw) == ""


def test_the_ic_ready_anchor_is_openhcls_shutdown_ic_renegotiating_on_com3() -> None:
    """Not VTL0's hv_utils line (OpenHCL restores VTL0's channel without a new negotiation),
    and not the GET device's "version negotiated" that every VTL2 boot prints first."""
    from testbed.backends.openvmm.trigger import MATCHERS

    rx = next(m for name, where, m in MATCHERS if name == "ic-ready" and where == "COM3")
    assert rx.search("[20.1] hyperv_ic_guest::shutdown: INFO version negotiated framework_version=30000")
    assert not rx.search("[19.8] guest_emulation_transport::process_loop: INFO [GET] version negotiated")
    assert not rx.search("[ 5.0] hv_utils: Shutdown IC version 3.2")
    phases = [name for name, _, _ in MATCHERS]
    assert phases[-1] == "ic-ready" and len(set(phases)) == len(phases)
