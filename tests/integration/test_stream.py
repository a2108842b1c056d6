"""Messages under traffic on real lab guests: with strategy none the stream loses the
messages posted in the save (its loss window, from one servicing, is where the shutdown
sweep finds it), the rest are delivered once or refused while the IC is down, and
every message is accounted for; with pause-resume none is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.core.config import VmConfig
from testbed.engine.options import RunOptions
from testbed.engine.playbook import Playbook, ScheduleSpec, StreamSpec
from testbed.engine.runner import Runner


def _run(tmp: Path, cfg: VmConfig, strategy: str) -> dict:  # type: ignore[type-arg]
    pb = Playbook(name=f"stream-{strategy}", vm_config="-", strategy=strategy, iterations=2,
                  schedule=ScheduleSpec(kind="fixed", offsets_ms=[800.0]), stream=StreamSpec(), expect={})  # fmt: skip
    res = Runner(pb, cfg, RunOptions(out=tmp / strategy)).run()
    assert [r["verdict"] for r in res.records] == ["preserved", "preserved"]  # the shutdown after servicing
    for r in res.records:
        h = r["stream"]["host_to_guest"]
        assert h["sent"] >= 140 and h["delivered"] + h["lost"] + h["duplicated"] + h["refused"] == h["sent"]
        assert r["stream"]["guest_to_host"]["received"] > 0 and r["stream"]["guest_to_host"]["lost"] == 0
    return res.summary["stream"]


@pytest.mark.vm
def test_every_stream_message_is_accounted_for(tmp_path: Path, ref_cfg: VmConfig) -> None:
    none = _run(tmp_path, ref_cfg, "none")
    h = none["host_to_guest"]
    assert h["lost"] > 0 and h["refused"] > 0 and h["delivered"] > 0 and h["duplicated"] == 0
    lo, hi = none["lost_window_guest_ms"]
    assert -10 < lo < 30 and 250 < hi < 400, none  # the save: ~300 ms from the paravisor's start
    assert none["offsets_per_min"] > 50 * none["shutdown_offsets_per_min"]
    pr = _run(tmp_path, ref_cfg, "pause-resume")
    assert pr["host_to_guest"]["lost"] == 0 and pr["lost_window_ms"] is None
