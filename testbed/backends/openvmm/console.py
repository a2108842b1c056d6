"""Reading OpenVMM's interactive console and log: what each printed line means.

The console's output arrives through a terminal: ANSI colour and cursor codes,
CRLF line ends, the ``openvmm> `` prompt and the echo of what was typed are
mixed into the log lines (``<uptime>s  LEVEL target: message field=value``,
u64 fields in hex).  :func:`parse` turns one raw line into a
:class:`ConsoleLine` with the message and fields cleaned, and :func:`event`
names what it says, from the exact texts OpenVMM prints (README, "Running
against a real OpenVMM host", lists them with the verdict each leads to).

Stdlib only, valid on Python 3.9: the host-side driver uses it too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PROMPT = "openvmm> "
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>78]|\x1b\][^\x07]*\x07")
# tracing-subscriber's format with openvmm's uptime timer: ``   5.123456789s  INFO
# openvmm_entry::repl:  vtl2 servicing complete duration=1234`` (spans, when shown,
# come before the target; the message follows ``target:`` and two spaces).
LOG = re.compile(
    r"^\s*(?:(?P<ts>\d+\.\d+)s\s+)?(?P<level>TRACE|DEBUG|INFO|WARN|ERROR)\s+(?P<prefix>.*?):\s\s(?P<msg>\S.*)$"
)
LOG_ONE_SPACE = re.compile(
    r"^\s*(?:(?P<ts>\d+\.\d+)s\s+)?(?P<level>TRACE|DEBUG|INFO|WARN|ERROR)\s+(?P<prefix>[\w:]+):\s(?P<msg>.*)$"
)
FIELD = re.compile(r"(?P<k>[A-Za-z_][\w.]*)=(?P<v>\"[^\"]*\"|\S+)")

# What OpenVMM prints, by the event name testbed uses. Order matters: the first match wins.
EVENTS = (
    ("servicing-complete", "vtl2 servicing complete"),
    # Builds before openvmm #1364 (2025-05; release/2411) run service-vtl2 in the console's
    # foreground and print only this when it returns (println!): nothing typed meanwhile
    # is read until then, so the console race cannot be run on them (evidence.py says so).
    ("servicing-foreground", "servicing time:"),
    ("servicing-failed", "vtl2 servicing failed"),
    ("shutdown-initiated", "shutdown initiated"),
    ("ic-not-ready", "shutdown ic not ready"),
    ("already-in-progress", "shutdown already in progress"),
    ("shutdown-failed", "shutdown failed with error code"),
    ("shutdown-comm-failure", "communication failure during shutdown"),
    ("no-shutdown-ic", "no shutdown ic configured"),
    ("guest-halted", "guest halted"),
    ("busy", "state change already in progress"),
    ("vtl0-failed", "guest reported vtl0 failed to start"),
    ("vtl0-started", "guest reported vtl0 started successfully"),
    ("phase:save-wait", "waiting for guest to send saved state"),
    ("phase:reload-igvm", "reloading IGVM file"),
    ("phase:vtl0-wait", "waiting for VTL0 to start"),
    ("phase:restore-done", "restore vtl2 complete"),
    ("console-panic", "failed to enable raw console mode"),
    # clap refusing a typed command's arguments (a flag this build's console lacks): the
    # command did not run. Checked last: only a line no other event names.
    ("console-refused", "error: unexpected argument"),
)

# Servicing returned (the console's line, or a foreground build's), or ended either way.
COMPLETE = ("servicing-complete", "servicing-foreground")
ENDS = (*COMPLETE, "servicing-failed")


# The servicing phases the host can see, in the order they happen: (name, where, what).
# "log" is openvmm's own output (its log and console); "COM3" is OpenHCL's console. The
# underhill helpers' lines are DEBUG (OPENVMM_LOG must enable them, as the vm_config's
# default "info,openvmm_helpers=debug,hvlite_helpers=debug" does: the crate was
# hvlite_helpers before openvmm #2579, 2025-12); the guest emulation device's and the
# console's are INFO; OpenHCL prints its own at its default level. Which builds print
# which line: SINCE below (read from microsoft/openvmm's history).
PHASES = (
    ("staging", "log", "staging new IGVM file"),
    ("save-wait", "log", "waiting for guest to send saved state"),
    ("received", "COM3", "received servicing request from host"),
    ("reload", "log", "reloading IGVM file"),
    ("vtl0-wait", "log", "waiting for VTL0 to start"),
    ("vtl2-restart", "COM3", "VTL2 restart, getting servicing state from the host"),
    ("restored", "log", "restore vtl2 complete"),
    ("vtl0-started", "log", "guest reported vtl0 started successfully"),
    ("complete", "log", "vtl2 servicing complete"),
)
# Where each phase's line comes from and which openvmm builds print it (git log -S on
# microsoft/openvmm; release/2411, 2505, 1.7.2511 and 1.8.2607 read with git grep):
# what an infra-error says when a phase's line never came.
SINCE = {
    "staging": "openvmm_helpers::underhill (hvlite_helpers before 2025-12) at DEBUG, every build since 2024-10",
    "save-wait": "openvmm_helpers::underhill (hvlite_helpers before 2025-12) at DEBUG, every build since 2024-10",
    "received": "OpenHCL's underhill_core::dispatch at INFO on COM3, since openvmm #2672 (2026-02; "
    "backported to release/1.7.2511, absent from release/2411 and 2505)",
    "reload": "openvmm_helpers::underhill (hvlite_helpers before 2025-12) at DEBUG, every build since 2024-10",
    "vtl0-wait": "openvmm_helpers::underhill (hvlite_helpers before 2025-12) at DEBUG, every build since 2024-10",
    "vtl2-restart": "OpenHCL's underhill_core::worker at INFO on COM3, every build since 2024-10",
    "restored": "guest_emulation_device at INFO, every build since 2024-10",
    "vtl0-started": "guest_emulation_device at INFO, every build since 2024-10",
    "complete": "the console at INFO since openvmm #1364 (2025-05); release/2411 prints 'servicing time: Nms'",
    "ic-ready": "OpenHCL's hyperv_ic_guest::shutdown at INFO on COM3, every build since 2024-10",
}

# The shutdown IC open again after servicing. With --vmbus-redirect (testbed's launch)
# VTL0's channel is served by OpenHCL, which restores it with its negotiated version (VTL0
# is not asked again, so hv_utils prints nothing on COM1); what reopens is OpenHCL's own
# channel to the host's IC: hyperv_ic_guest's "version negotiated" on COM3 (openvmm
# vm/devices/hyperv_ic_guest/src/shutdown.rs, INFO). "[GET] version negotiated", printed
# earlier by every VTL2 boot, is another device's and does not match. A regex.
IC_READY = ("COM3", r"hyperv_ic_guest::shutdown\b.*\bversion negotiated")


@dataclass
class ConsoleLine:
    text: str  # the line as shown, escapes and prompt removed
    message: str  # the log message without timestamp, level, target and fields
    level: str | None = None
    target: str | None = None
    uptime_s: float | None = None
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def event(self) -> str | None:
        return event(self.message)


def clean(raw: str) -> str:
    """A terminal line without escapes, carriage returns, prompts and typed echo."""
    text = ANSI.sub("", raw).replace("\r", "")
    while text.startswith(PROMPT.rstrip()):
        text = text[len(PROMPT.rstrip()) :].lstrip(" ")
    return text.rstrip()


def parse(raw: str) -> ConsoleLine:
    text = clean(raw)
    m = LOG.match(text) or LOG_ONE_SPACE.match(text)
    if not m:
        return ConsoleLine(text, text)
    msg = m.group("msg")
    fields = {f.group("k"): f.group("v").strip('"') for f in FIELD.finditer(msg)}
    first = FIELD.search(msg)
    message = msg[: first.start()].rstrip() if first else msg
    ts = m.group("ts")
    target = m.group("prefix").rsplit(" ", 1)[-1].rsplit("}:", 1)[-1].strip(": ")
    return ConsoleLine(text, message or msg, m.group("level"), target, float(ts) if ts else None, fields)


def event(message: str) -> str | None:
    low = message.lower()
    for name, needle in EVENTS:
        if needle.lower() in low:
            return name
    return None


def hex_or_int(value: str) -> int | None:
    """``0x80004005`` or ``603`` (u64 fields print in hex) -> int."""
    try:
        return int(value, 16) if value.lower().startswith("0x") else int(value)
    except ValueError:
        return None
