"""A stand-in ``openvmm`` for the tests: the real command line, console and log
format, backed by a reference-lab QEMU guest (its paravisor stands for OpenHCL).

It keeps the host rules the backend must live with, read from openvmm's source
(the facts are in issue "OpenVMM backend" and the README):
* flags: the real names; an unknown one is refused as clap refuses it (exit 2);
  ``--hv --vtl2 --igvm`` are required for OpenHCL;
* terminal: with no controlling terminal the console thread panics ("failed to
  enable raw console mode") and the process aborts (SIGABRT); a controlling
  terminal with stdin a pipe works but prints no prompt; COM1 bound to the
  console (the default) starts in input mode until Ctrl-Q, and bytes after
  Ctrl-Q in the same read are dropped; EOF never ends the console;
* history: every command is appended to ~/.local/state/openvmm/history; if that
  cannot be written, the first command aborts openvmm;
* servicing: ``service-vtl2`` returns at once and runs in the background;
  ``vtl2 servicing complete duration=..`` or ``vtl2 servicing failed`` follow;
  a stuck save or restore hangs forever (and ``quit`` waits behind it);
* shutdown: goes straight to the shutdown IC, also during servicing; ``shutdown
  initiated`` only after the guest acknowledged; a request while the IC is
  closed waits for it to reopen and is then refused (``shutdown ic not ready``);
  a second request while one is pending: ``shutdown already in progress``;
* log lines on stderr: uptime, level, target, two spaces, message, fields.

Knobs: ``TESTBED_STRATEGY`` (set by the backend from the playbook) is the lab's
preservation: ``none`` behaves as OpenVMM before 7001a13 (#954), ``pause-resume``
as after it (#962). ``-c OPENHCL_TEST_CONFIG=SERVICING_SAVE_FAIL|SERVICING_SAVE_STUCK|
SERVICING_RESTORE_STUCK`` selects the lab's faulty images; ``--igvm`` files name a
lab image on their first line (``testbed-lab-paravisor v2``). Test support, not
product code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import termios
import time
import tty
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if os.environ.get("TESTBED_STANDIN_CACHE_DIR"):  # over SSH: the lab image of this machine's cache
    os.environ["TESTBED_CACHE_DIR"] = os.environ["TESTBED_STANDIN_CACHE_DIR"]

PROMPT = "openvmm> "
# Which openvmm it stands in for (TESTBED_STANDIN_RELEASE in its environment; the tests
# set it in a wrapper binary, so the backend's probe of --version and --help sees it
# too), read from microsoft/openvmm's release branches:
#   main  openvmm 0.1.0+g<sha> (--version since #4162), the openvmm_helpers crate,
#         OpenHCL's "received servicing request from host" on COM3 (#2672), service-vtl2
#         in the background ("vtl2 servicing complete", #1364);
#   2505  release/2505: no --version (clap refuses it), hvlite_helpers, no COM3 receipt line;
#   2411  release/2411: as 2505, and service-vtl2 runs in the console's foreground: the
#         console reads nothing until it returns and prints "servicing time: Nms" (println!).
RELEASE = os.environ.get("TESTBED_STANDIN_RELEASE", "main")
VERSION = "openvmm 0.1.0+g1488a37b7 (testbed stand-in)"
HELPERS = "openvmm_helpers::underhill" if RELEASE == "main" else "hvlite_helpers::underhill"
# service-vtl2's flags (openvmm_entry repl.rs); a stand-in for an older build lists fewer
# in TESTBED_STANDIN_SERVICE_FLAGS (the vm_config's openvmm.env reaches it).
SERVICE_FLAGS = ("-u", "--user-mode-only", "-n", "--nvme-keepalive", "--mana-keepalive")
if RELEASE == "2411":
    SERVICE_FLAGS = ("-u", "--user-mode-only")


def service_args_error(args: list[str]) -> str | None:
    """What clap says of service-vtl2's arguments (None: they parse)."""
    known = os.environ.get("TESTBED_STANDIN_SERVICE_FLAGS")
    flags = set(known.split(",")) if known else set(SERVICE_FLAGS)
    i = 0
    while i < len(args):
        if args[i] == "--igvm":
            if i + 1 >= len(args):
                return "a value is required for '--igvm <PATH>' but none was supplied"
            i += 2
            continue
        if args[i] not in flags:
            return f"unexpected argument '{args[i]}' found"
        i += 1
    return None


T_START = time.monotonic()
BOOL_FLAGS = {"--hv", "--vtl2", "--vmbus-redirect", "--help", "-h", "--version", "-V"}
VALUE_FLAGS = {"--igvm", "-m", "--memory", "-p", "--processors", "--vmbus-com1-serial", "--vmbus-com2-serial",
               "--com1", "--com2", "--com3", "--com4", "-c", "--cmdline", "--vmbus-vtl2-vsock-path",
               "--guest-shutdown-action", "--guest-crash-action", "--guest-reset-action", "--vmbus-scsi",
               "--openhcl-controller", "--disk", "--rpc"}  # fmt: skip
MULTI = {"-c", "--cmdline", "--disk", "--vmbus-scsi", "--openhcl-controller"}
ACTIONS = re.compile(r"^(reset|halt|exit|exit:\d+)$")
BINDING = re.compile(r"^(console|stderr|none|term|listen=\S+|file=\S+)$")
TEST_CONFIG = {"SERVICING_SAVE_FAIL": "missing-image", "SERVICING_SAVE_STUCK": "v2-hang",
               "SERVICING_RESTORE_STUCK": "v2-hang"}  # fmt: skip
HELP = "Usage: openvmm [OPTIONS]\n\nOptions:\n" + "".join(
    f"  {f}\n" for f in sorted(BOOL_FLAGS | VALUE_FLAGS)
)


def clap_error(msg: str) -> None:
    sys.stderr.write(f"error: {msg}\n\nUsage: openvmm [OPTIONS]\n\nFor more information, try '--help'.\n")
    sys.exit(2)


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {m: [] for m in MULTI}
    i = 0
    while i < len(argv):
        a = argv[i]
        name, _, inline = a.partition("=") if a.startswith("--") else (a, "", "")
        if name in BOOL_FLAGS:
            opts[name] = True
        elif name in VALUE_FLAGS:
            if not inline:
                i += 1
                if i >= len(argv):
                    clap_error(f"a value is required for '{name} <VALUE>' but none was supplied")
                inline = argv[i]
            if name in MULTI:
                opts[name].append(inline)
            else:
                opts[name] = inline
        else:
            clap_error(f"unexpected argument '{a}' found")
        i += 1
    for f in ("--guest-shutdown-action", "--guest-crash-action", "--guest-reset-action"):
        if f in opts and not ACTIONS.match(opts[f]):
            clap_error(
                f"invalid value '{opts[f]}' for '{f} <ACTION>': expected reset, halt, exit, or exit:<code>, got '{opts[f]}'"
            )
    for f in ("--vmbus-com1-serial", "--vmbus-com2-serial", "--com1", "--com2", "--com3", "--com4"):
        if f in opts and not BINDING.match(opts[f]):
            clap_error(
                f"invalid value '{opts[f]}' for '{f} <SERIAL>': invalid serial configuration: '{opts[f]}' is not a known option"
            )
    consoles = [
        f
        for f in ("--com1", "--vmbus-com1-serial", "--com3")
        if opts.get(f, "console" if f == "--com1" else "") == "console"
    ]
    if len(consoles) > 1:
        clap_error(f"console already set by {consoles[0]}")
    return opts


class Stdout:
    """The console's terminal: raw mode, CRLF line ends."""

    def __init__(self) -> None:
        self.prompting = os.isatty(0)

    def write(self, text: str) -> None:
        os.write(1, text.replace("\n", "\r\n").encode())

    def prompt(self) -> None:
        if self.prompting:
            self.write(PROMPT)


LEVELS = ("ERROR", "WARN", "INFO", "DEBUG", "TRACE")


def enabled(level: str, target: str) -> bool:
    """OPENVMM_LOG as tracing-subscriber's EnvFilter reads it: ``info,openvmm_helpers=debug``
    (the longest matching target prefix wins; without any directive, info). Setting it to
    only ``openvmm_helpers=debug`` drops the implicit info for everything else."""
    spec = os.environ.get("OPENVMM_LOG", "info")
    best, best_len = "error" if spec.strip() else "info", -1
    for d in (x.strip() for x in spec.split(",") if x.strip()):
        tgt, _, lvl = d.rpartition("=") if "=" in d else ("", "", d)
        if (not tgt or target == tgt or target.startswith(tgt + "::")) and len(tgt) > best_len:
            best, best_len = lvl, len(tgt)
    return LEVELS.index(level) <= LEVELS.index(best.upper()) if best.upper() in LEVELS else False


def log(level: str, target: str, message: str, **fields: Any) -> None:
    """A tracing line as openvmm prints it (no ANSI: stderr is a pipe here), when
    OPENVMM_LOG lets it through."""
    if not enabled(level, target):
        return
    up = time.monotonic() - T_START
    # &str fields print quoted ({:?}), errors and integers plain, bools as true/false
    shown = " ".join(
        f'{k}="{v}"' if isinstance(v, str) and k != "error"
        else f"{k}={str(v).lower()}" if isinstance(v, bool) else f"{k}={v}"
        for k, v in fields.items()
    )  # fmt: skip
    line = f"{int(up):4}.{int((up % 1) * 1e9):09}s {level:>5} {target}:  {message}{' ' + shown if shown else ''}\n"
    os.write(2, line.encode())


def panic(message: str) -> None:
    os.write(2, f"thread 'main' panicked at openvmm_entry/src/lib.rs:\n{message}\n"
                "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n".encode())  # fmt: skip
    os.abort()


class StandIn:
    def __init__(self, opts: dict[str, Any]) -> None:
        self.opts = opts
        self.out = Stdout()
        self.strategy = os.environ.get("TESTBED_STRATEGY", "pause-resume")
        self.fault = next((TEST_CONFIG[v.split("=", 1)[1]] for v in opts["-c"] + opts["--cmdline"]
                           if v.startswith("OPENHCL_TEST_CONFIG=") and v.split("=", 1)[1] in TEST_CONFIG), None)  # fmt: skip
        self.image = igvm_image(opts["--igvm"])
        self.com1 = binding_file(opts.get("--vmbus-com1-serial", "console"))
        self.com3 = binding_file(opts.get("--com3", "none"))
        self.input_mode = opts.get("--com1", "console") == "console"  # COM1 defaults to the console
        self.agent: Any = None
        self.name = f"standin-{os.getpid()}"
        self.servicing: asyncio.Task[None] | None = None
        self.shutdown_pending = False
        self.svc_id = 0
        self.history = (
            Path(os.environ.get("XDG_STATE_HOME") or Path(os.environ.get("HOME", "/")) / ".local/state")
            / "openvmm/.openvmm_history"
        )

    # ---- the lab guest standing for OpenHCL + VTL0 -------------------------------------
    async def boot(self) -> None:
        from testbed.backends.qemu.agent.program import Agent
        from testbed.backends.qemu.backend import QemuBackend
        from testbed.core.paths import runtime_dir
        from testbed.engine.playbook import load_vm_config

        cfg = load_vm_config(
            os.environ.get("TESTBED_STANDIN_VM_CONFIG", ROOT / "vm_configs/reference-linux.yaml")
        )
        self.knobs = cfg.lab  # type: ignore[attr-defined]
        with QemuBackend() as b:  # only to find (or make) the cached READY snapshot
            qvm = b.provision(cfg.with_paravisor(self.image), self.strategy)  # type: ignore[attr-defined]
            spec = qvm.spec(b.ensure_snapshot(qvm))
        self.agent = Agent()
        wd = runtime_dir() / "vms" / self.name
        await self.agent.op_launch(self.name, str(wd), str(runtime_dir() / "leases"), spec, os.getpid())
        await self.agent.op_wait_ready(self.name, 90, incoming=True)
        self.vm = self.agent.vms[self.name]
        self.relay = self.vm.relay
        self.relay.on_phase = self.on_lab_phase
        log("INFO", "openvmm_entry", "restoring history from " + str(self.history))

    def on_lab_phase(self, name: str, _t_ns: int) -> None:
        """The lab paravisor's servicing steps as OpenVMM and OpenHCL print them: the host's
        openvmm_helpers lines at DEBUG (underhill.rs: after the saved state came, "reloading
        IGVM file"; once the reload returned, "waiting for VTL0 to start"), OpenHCL's restart
        on COM3, and OpenHCL's shutdown IC client negotiating with the host again on COM3."""
        if name == "save-end":
            log("DEBUG", HELPERS, "reloading IGVM file")
        elif name == "exec":
            log("DEBUG", HELPERS, "waiting for VTL0 to start")
        elif name == "restore-start":
            self.emit(
                self.com3, "[ 0.000000] underhill_core: VTL2 restart, getting servicing state from the host\n"
            )
        elif name == "ic-reoffered":  # OpenHCL's channel to the host's shutdown IC, open again
            self.emit(self.com3, "[ 0.000000] hyperv_ic_guest::shutdown: INFO version negotiated "
                      "framework_version=30000 message_version=30002\n")  # fmt: skip

    # ---- serial ports ------------------------------------------------------------------
    async def serial(self) -> None:
        """The lab's serial log -> COM1 (VTL0's lines, as a Linux guest prints them) and
        COM3 (the paravisor's, as OpenHCL's)."""
        pos = 0
        partial = b""  # a line QEMU has not finished writing yet: kept for the next read
        self.emit(self.com1, "Ubuntu 24.04 LTS vtl0 ttyS0\n\nvtl0 login: \n")
        while True:
            try:
                with (self.vm.workdir / "serial.log").open("rb") as f:
                    f.seek(pos)
                    data = f.read()
            except OSError:
                data = b""
            pos += len(data)
            *whole, partial = (partial + data).split(b"\n")
            for raw in (ln.decode(errors="replace") for ln in whole):
                m = re.match(r"^TB t=(\d+) (\S+) (.*)$", raw.strip())
                if not m:
                    continue
                ts, who, rest = int(m.group(1)) / 1e6, m.group(2), m.group(3)
                if who == "VTL0" and rest.startswith("SHUTDOWN "):
                    self.emit(
                        self.com1,
                        f"[{ts:12.6f}] hv_utils: Shutdown request received - graceful shutdown initiated\n",
                    )
                    self.acked.set()
                elif who == "VTL0":
                    self.emit(self.com1, f"[{ts:12.6f}] testbed-vtl0: {rest}\n")
                elif rest.startswith("svc-start") and RELEASE == "main":
                    self.emit(
                        self.com3,
                        f"[{ts:12.6f}] underhill_core::dispatch: received servicing request from host\n",
                    )
                else:
                    self.emit(self.com3, f"[{ts:12.6f}] underhill: {rest}\n")
            await asyncio.sleep(0.002)

    def emit(self, path: Path | None, text: str) -> None:
        if path is not None:
            with path.open("a") as f:
                f.write(text)

    async def watch_halt(self) -> None:
        ev = await asyncio.shield(self.vm.shutdown)
        reason = (ev.get("data") or {}).get("reason")
        log(
            "INFO",
            "openvmm_entry::repl",
            "guest halted",
            reason="PowerOff" if reason == "guest-shutdown" else "TripleFault",
        )

    # ---- commands ----------------------------------------------------------------------
    async def service(self, args: list[str]) -> None:
        image = self.image
        if "--igvm" in args:
            image = igvm_image(args[args.index("--igvm") + 1])
        image = self.fault or image
        self.svc_id += 1
        start = time.monotonic()
        log("DEBUG", HELPERS, "staging new IGVM file")
        log("DEBUG", HELPERS, "waiting for guest to send saved state")
        knobs = {"save_ms": self.knobs.save_ms, "restore_ms": self.knobs.restore_ms,
                 "blackout_ms": self.knobs.blackout_ms, "attach_ms": self.knobs.vtl0_attach_ms,
                 "regression_pct": self.knobs.regression_pct}  # fmt: skip
        self.relay.start_servicing(self.svc_id, image, knobs)
        while "done_ns" not in self.relay.svc and not self.vm.shutdown.done():
            await asyncio.sleep(0.002)
        if self.vm.shutdown.done():
            return
        ms = int((time.monotonic() - start) * 1000)
        if self.relay.svc.get("ok"):
            self.image = image
            if self.relay.svc.get("boot_after") not in (None, self.relay.svc.get("boot_before")):
                # The new OpenHCL reported its restore over GET: only a real restart (a
                # new boot id from the lab paravisor) makes the device say so.
                log("INFO", "guest_emulation_device", "restore vtl2 complete", success=True)
                log("INFO", "guest_emulation_device", "guest reported vtl0 started successfully")
            if RELEASE == "2411":
                self.out.write(f"servicing time: {ms}ms\n")  # println!, after the foreground call
            else:
                log("INFO", "openvmm_entry::repl", "vtl2 servicing complete", duration=ms)
        else:
            log(
                "ERROR",
                "openvmm_entry::repl",
                "vtl2 servicing failed",
                error=self.relay.svc.get("reason") or "failed",
            )

    async def shutdown(self) -> None:
        self.shutdown_pending = True
        if self.relay.ic != "ready":
            while self.relay.ic != "ready" and not self.vm.shutdown.done():
                await asyncio.sleep(0.002)
            self.shutdown_pending = False
            log("ERROR", "openvmm_entry::repl", "shutdown ic not ready")
            return
        self.acked = asyncio.Event()
        self.relay.request_shutdown(f"sd{self.svc_id}", "testbed")
        await self.acked.wait()
        log("INFO", "openvmm_entry::repl", "shutdown initiated")

    async def command(self, line: str) -> bool:
        words = line.split()
        if not words:
            return True
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log("WARN", "openvmm_entry::repl", f"could not create directory: {e}")
        try:
            with self.history.open("a") as f:
                f.write(line + "\n")
        except OSError as e:  # rl.append_history(history_file).unwrap()
            panic(f"called `Result::unwrap()` on an `Err` value: {e}")
        cmd, args = words[0], words[1:]
        if cmd == "service-vtl2":
            bad = service_args_error(args)
            if bad:  # clap refuses the command line; the command does not run
                self.out.write(
                    f"error: {bad}\n\nUsage: service-vtl2 [OPTIONS]\n\nFor more information, try '--help'.\n"
                )
            elif self.servicing is not None and not self.servicing.done():
                self.out.write("state change already in progress\n")
            elif RELEASE == "2411":  # awaited in the console's loop: nothing else is read meanwhile
                await self.service(args)
            else:
                self.servicing = asyncio.ensure_future(self.service(args))
        elif cmd == "shutdown":
            if self.shutdown_pending:
                self.out.write("shutdown already in progress\n")  # println!, not a log line
            else:
                asyncio.ensure_future(self.shutdown())
        elif cmd == "inspect":
            self.out.write("{ ... }\n")
        elif cmd in ("quit", "q"):
            log("INFO", "openvmm_entry::repl", "quitting")
            if self.servicing is not None:
                await self.servicing  # quit waits behind a servicing (forever, if it is stuck)
            log("INFO", "openvmm_entry", "vm stopped")
            return False
        else:
            self.out.write(f"error: unrecognized subcommand '{cmd}'\n")
        return True

    async def console(self) -> None:
        loop = asyncio.get_running_loop()
        data: asyncio.Queue[bytes] = asyncio.Queue()
        loop.add_reader(0, lambda: data.put_nowait(_read0()))
        buf = b""
        self.out.prompt()
        while True:
            chunk = await data.get()
            if not chunk:  # EOF: the console re-prompts and reads again (it spins on a pipe)
                await asyncio.sleep(0.01)
                continue
            if self.input_mode:
                if b"\x11" in chunk:  # Ctrl-Q: command mode; the rest of this read is dropped
                    self.input_mode = False
                    self.out.prompt()
                continue
            for b in chunk:
                ch = bytes([b])
                if ch in (b"\r", b"\n"):
                    self.out.write("\n")
                    line, buf = buf.decode(errors="replace"), b""
                    if not await self.command(line):
                        return
                    self.out.prompt()
                elif ch == b"\x7f":
                    buf = buf[:-1]
                else:
                    buf += ch
                    self.out.write(ch.decode(errors="replace"))  # the line editor echoes

    async def run(self) -> int:
        await self.boot()
        self.acked = asyncio.Event()
        tasks = [asyncio.ensure_future(self.serial()), asyncio.ensure_future(self.watch_halt())]
        try:
            await self.console()
        finally:
            for t in tasks:
                t.cancel()
            await self.agent.close_all()
        return 0


def _read0() -> bytes:
    try:
        return os.read(0, 4096)
    except OSError:
        return b""


def igvm_image(path: str) -> str:
    try:
        first = Path(path).read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        sys.stderr.write(f"error: failed to open igvm file {path}\n")
        sys.exit(1)
    m = re.match(r"^testbed-lab-paravisor (\S+)", first)
    return m.group(1) if m else "v2"


def igvm_file(folder: Path, image: str) -> Path:
    """A lab "IGVM" file for the stand-in: its first line names the lab image it boots."""
    p = folder / f"openhcl-{image}.bin"
    p.write_text(f"testbed-lab-paravisor {image}\n")
    return p


def binding_file(binding: str) -> Path | None:
    return Path(binding[5:]) if binding.startswith("file=") else None


def main() -> None:
    opts = parse_args(sys.argv[1:])
    if opts.get("--version") or opts.get("-V"):
        if RELEASE != "main":
            clap_error(f"unexpected argument '{'--version' if opts.get('--version') else '-V'}' found")
        print(VERSION)
        return
    if opts.get("--help") or opts.get("-h"):
        print(HELP)
        return
    if "--igvm" in opts and not (opts.get("--hv") and opts.get("--vtl2")):
        clap_error("the following required arguments were not provided:\n  --hv\n  --vtl2")
    if "--igvm" not in opts:
        clap_error("the following required arguments were not provided:\n  --igvm <FILE>")
    try:
        tty_fd = os.open("/dev/tty", os.O_RDWR)
    except OSError as e:
        panic(f"failed to enable raw console mode: {e}")
    saved = termios.tcgetattr(tty_fd)
    tty.setraw(tty_fd)  # crossterm's raw mode, on the controlling terminal
    standin = StandIn(opts)
    try:
        code = asyncio.run(standin.run())
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(tty_fd, termios.TCSADRAIN, saved)
    sys.exit(code)


if __name__ == "__main__":
    main()
