"""What a run will do, decided before anything boots: the cases with the command
line's overrides, the lanes, each case's schedule object, and the refusal of whatever
the backend's declared capabilities do not cover. ``Runner`` runs a ``RunPlan``; the
CLI's ``--dry-run`` prints one without opening a backend."""

from __future__ import annotations

from pathlib import Path

from testbed.core.capabilities import Capabilities
from testbed.core.config import ConfigError, VmConfig
from testbed.engine import requirements
from testbed.engine import schedule as sched
from testbed.engine.fleet import guest_limit, split_lanes
from testbed.engine.options import RunOptions
from testbed.engine.playbook import BisectSpec, Case, Playbook


class RunPlan:
    """A playbook and a vm_config as one run on a backend of ``kind`` with ``caps``."""

    def __init__(self, pb: Playbook, cfg: VmConfig, opts: RunOptions, kind: str, caps: Capabilities,
                 playbook_path: Path | None = None) -> None:  # fmt: skip
        self.pb, self.opts, self.kind, self.caps, self.playbook_path = pb, opts, kind, caps, playbook_path
        self.cfg = cfg.with_lab(pb.lab)
        self.strategy = opts.strategy or pb.strategy
        self.seed = opts.seed if opts.seed is not None else pb.seed
        self.reset = opts.reset or pb.reset
        self.bisect = pb.bisect
        if opts.builds:
            self.bisect = (pb.bisect or BisectSpec(builds=opts.builds)).model_copy(
                update={"builds": opts.builds}
            )
        self.lanes, self.lanes_note = self.lanes_wanted(playbook_path)
        self.check_capabilities(playbook_path)

    def check_capabilities(self, path: Path | None) -> None:
        """Refuse, before anything boots, what the backend has not declared it can do, at the
        playbook's file:line of the key that asked (``testbed.engine.requirements``)."""
        asked = self.opts.parallel or self.pb.parallel
        need = requirements.asks(self.pb, self.cases(), parallel=asked, builds=self.bisect is not None)
        where = path or Path(self.pb.name)
        requirements.refuse_missing(need, self.caps, self.kind, where)
        if self.bisect is not None:
            known = self.caps.images or self.cfg.build_names()
            requirements.check_images(self.bisect.builds, known, self.kind, where)
        for c in self.cases():
            kind = (c.schedule or self.pb.schedule).kind
            if kind == "phases":
                self.phases_of(c, path)  # refuses phases the backend does not observe
            if kind == "flaky":
                self.flaky_phases(c, path)
            if self.bisect is not None:
                self.schedule_of(c)  # refuses a schedule with no offsets of its own

    def lanes_wanted(self, path: Path | None) -> tuple[int, str]:
        """How many guests race at once: ``--parallel`` or the playbook's ``parallel``,
        capped by the host's ``max_guests`` (else the machine-wide slot limit), and
        refused on a backend that has not declared it can run lanes."""
        asked = self.opts.parallel or self.pb.parallel
        if self.opts.fleet and len(self.opts.fleet) > 1:
            return split_lanes(self.opts.fleet, asked)
        if asked == 1:
            return 1, ""
        if self.opts.backend is not None and self.opts.open_backend is None:
            raise ConfigError(path or Path(self.pb.name), None,
                              f"parallel {asked}: this caller gave one backend and no way to open more")  # fmt: skip
        limit = guest_limit(self.opts.max_guests)
        if asked > limit:
            return limit, f"parallel {asked} capped to {limit}, the host's max_guests"
        return asked, ""

    def cases(self) -> list[Case]:
        """The playbook's cases with the command line's overrides: ``--offsets`` replaces
        each case's schedule and, unless ``--iterations`` is given too, its count becomes
        the iterations (so ``random:-30:60:80`` runs 80, not the playbook's 16)."""
        cases = self.pb.resolved_cases()
        spec = self.opts.offsets
        n = self.opts.iterations or (spec.points if spec is not None else None)
        if n or spec:
            cases = [
                c.model_copy(update={k: v for k, v in (("iterations", n), ("schedule", spec)) if v})
                for c in cases
            ]
        return cases

    def describe(self) -> str:
        """What the run will do, said before it starts."""
        parts = []
        for c in self.cases():
            n = c.iterations or self.pb.iterations
            s = c.schedule or self.pb.schedule
            what = f"{c.name}: {n} iteration{'s' if n != 1 else ''}"
            if self.bisect is not None:
                b = self.bisect.builds
                what = (f"{c.name}: bisect over {len(b)} builds ({b[0]} good .. {b[-1]} bad), an SPRT per build "
                        f"(p0 {self.bisect.p0:g} vs p1 {self.bisect.p1:g}, alpha {self.bisect.alpha:g}, beta "
                        f"{self.bisect.beta:g}, at most {self.bisect.max_per_build} tries), budget {n}, "
                        f"schedule {s.kind}")  # fmt: skip
            elif s.kind == "flaky":
                ph = self.flaky_phases(c)
                what = (f"{c.name}: a flaky-window search of at most {n} iterations over [{s.lo_ms:g}, {s.hi_ms:g}] ms "
                        f"in {s.buckets} buckets" + (f" and {len(ph)} servicing phases" if ph else "")
                        + f", until every loss rate is below {s.target_rate:.0%} at 95% or a window is found")  # fmt: skip
            elif c.shutdown in ("offset", "ic-ready"):
                what += f", schedule {s.kind}" + (
                    " of delays after the IC's re-offer" if c.shutdown == "ic-ready" else ""
                )
                if s.points is not None and s.points != n:
                    what += (
                        f" of {s.points} offsets, {'cycled to' if s.points < n else 'cut to the first'} {n}"
                    )
            parts.append(what)
        if self.lanes > 1:
            parts.append(
                f"{self.lanes} guests at once" + (f" ({self.lanes_note})" if self.lanes_note else "")
            )
        return "; ".join(parts)

    def phases_of(self, case: Case, path: Path | None = None) -> list[str]:
        """The phases a ``kind: phases`` schedule fires on: the backend's, or the named
        ones, which must be among them."""
        where = path or self.playbook_path or Path(self.pb.name)
        observe = self.caps.phases
        if observe is None or not self.caps.has("phases"):
            raise ConfigError(where, None, f"case {case.name}: schedule kind phases: the {self.kind} backend "
                                           f"cannot fire on servicing phases: {self.caps.why_not('phases')}")  # fmt: skip
        if case.shutdown != "offset":
            raise ConfigError(where, None, f"case {case.name}: schedule kind phases fires on phases; "
                                           f"leave shutdown at offset (it is {case.shutdown!r})")  # fmt: skip
        known: list[str] = list(observe(self.strategy))
        s = case.schedule or self.pb.schedule
        unknown = [p for p in (s.phases or []) if p not in known]
        if unknown:
            raise ConfigError(where, None, f"case {case.name}: phases {', '.join(unknown)} are not observable with "
                                           f"strategy {self.strategy} on {self.kind}; it shows: "
                                           f"{', '.join(known)}")  # fmt: skip
        return [p for p in known if p in s.phases] if s.phases else known

    def flaky_phases(self, case: Case, path: Path | None = None) -> list[str]:
        """The phases a flaky-window search probes besides its buckets: the backend's
        (or the named ones), or none where the backend observes no phases."""
        s = case.schedule or self.pb.schedule
        if not self.caps.has("phases"):
            if s.phases:
                self.phases_of(case, path)  # says why the named phases cannot be used
            return []
        return self.phases_of(case, path)

    def schedule_of(self, case: Case) -> sched.Schedule:
        """The case's schedule object (``testbed.engine.schedule.build`` picks it)."""
        s = case.schedule or self.pb.schedule
        phases = (
            self.phases_of(case)
            if s.kind == "phases"
            else self.flaky_phases(case)
            if s.kind == "flaky"
            else []
        )
        try:
            return sched.build(s, case.iterations or self.pb.iterations, case.shutdown, seed=self.seed,
                               phases=phases, bisect=self.bisect)  # fmt: skip
        except ValueError as e:
            raise ConfigError(self.playbook_path or Path(self.pb.name), None, str(e)) from None

    def iterations_of(self, case: Case) -> int:
        return self.schedule_of(case).size

    def total(self) -> int:
        """Tries at most, over every case (a search may stop sooner)."""
        return sum(self.iterations_of(c) for c in self.cases())
