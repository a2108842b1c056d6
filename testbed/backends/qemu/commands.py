"""The QEMU kind's own commands, mounted under ``testbed`` by the registry: ``image``
(build, export, import the reference guest image) and ``vm`` (boot one by hand, list
and stop what the leases name)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from testbed.backends.commands import exit_codes, fail, out
from testbed.backends.qemu.config import QemuVmConfig
from testbed.core.config import ConfigError, load_model
from testbed.core.paths import runtime_dir
from testbed.hostprog import leases

DEFAULT_CONFIG = Path("vm_configs/reference-linux.yaml")
image_app = typer.Typer(help="Build and inspect the reference guest image.", no_args_is_help=True)
vm_app = typer.Typer(help="Start, list and stop reference VMs by hand.", no_args_is_help=True)


def commands() -> dict[str, typer.Typer]:
    return {"image": image_app, "vm": vm_app}


# ---- image -------------------------------------------------------------------------


def _reference_config(path: Path) -> Any:
    """A vm_config of the reference lab (the image and vm commands build and boot it)."""
    from testbed.core.config import load_yaml

    data = load_yaml(path)
    kind = data.get("backend", "qemu") if isinstance(data, dict) else "qemu"
    if kind != "qemu":
        raise ConfigError(
            path,
            None,
            f"backend {kind}: these commands build and boot the reference lab's guest; give a vm_config of the QEMU backend",
        )
    return load_model(path, QemuVmConfig).anchored(path.resolve().parent)


@image_app.command("build")
def image_build(
    config: Annotated[Path, typer.Option(help="vm_config to build for")] = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option(help="rebuild even on a cache hit")] = False,
) -> None:
    """Build the reference kernel + initramfs (cached by a hash of every input).

    \b
    testbed image build --config vm_configs/reference-linux.yaml
    """
    from testbed.backends.qemu.image import build_image, cached_image, resolve_inputs

    with exit_codes():
        cfg = _reference_config(config)
        t = time.monotonic()
        hit = not force and cached_image(resolve_inputs(cfg).key()) is not None
        img = build_image(cfg, force=force)
    out.print(
        f"image {img.key} ({'cache hit' if hit else 'built'}) in {time.monotonic() - t:.1f} s: {img.directory}"
    )
    for k in ("kernel_package", "kernel_version", "kernel_release", "busybox_version", "modules"):
        out.print(f"  {k}: {img.manifest.get(k)}", highlight=False)


@image_app.command("export")
def image_export(
    file: Annotated[Path, typer.Argument(help="archive to write, e.g. testbed-image.tar.gz")],
    config: Annotated[Path, typer.Option(help="vm_config whose image to export")] = DEFAULT_CONFIG,
) -> None:
    """Write the built image (kernel, initramfs, manifest) to an archive, for hosts with no package mirror.

    \b
    testbed image export testbed-image.tar.gz
    """
    import tarfile

    from testbed.backends.qemu.image import build_image

    with exit_codes():
        img = build_image(_reference_config(config))
    with tarfile.open(file, "w:gz") as tar:
        tar.add(img.directory, arcname=f"images/{img.key}")
    out.print(f"exported image {img.key} to {file}")


@image_app.command("import")
def image_import(
    file: Annotated[Path, typer.Argument(help="archive written by 'testbed image export'")],
) -> None:
    """Put an exported image into this machine's cache (no apt needed here afterwards).

    \b
    testbed image import testbed-image.tar.gz
    """
    import json as _json
    import tarfile

    from testbed.core.paths import cache_dir

    with tarfile.open(file, "r:gz") as tar:
        names = tar.getnames()
        keys = {n.split("/")[1] for n in names if n.startswith("images/") and n.count("/") >= 1}
        if len(keys) != 1 or not any(n.endswith("manifest.json") for n in names):
            fail(2, f"{file}: not an archive written by 'testbed image export'")
        # The "data" filter refuses absolute paths, links out of the tree and devices;
        # Python before 3.11.4 lacks filters, so check the members by hand there.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(cache_dir(), filter="data")
        else:
            for m in tar.getmembers():
                if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                    fail(2, f"{file}: refusing unsafe member {m.name!r}")
            tar.extractall(cache_dir())
    key = keys.pop()
    manifest = _json.loads((cache_dir() / "images" / key / "manifest.json").read_text())
    out.print(f"imported image {key} (kernel {manifest.get('kernel_release')})")


# ---- vm ------------------------------------------------------------------------------


@vm_app.command("up")
def vm_up(
    config: Annotated[Path, typer.Option(help="vm_config")] = DEFAULT_CONFIG,
    poweroff: Annotated[
        bool, typer.Option("--poweroff", help="power the VM off (ACPI) once it is ready")
    ] = False,
) -> None:
    """Boot a reference VM to READY; keep it until Ctrl-C (or power it off with --poweroff).

    The VM lives as long as this command: the host agent kills QEMU when its
    owner goes away, so nothing is ever left running.

    \b
    testbed vm up --poweroff
    """
    from testbed.backends.qemu.backend import QemuBackend

    with exit_codes():
        cfg = _reference_config(config)
    with QemuBackend() as b:
        with exit_codes():
            vm = b.provision(cfg)
            ready = b.start(vm, reset="cold")
        try:
            info = b.uname(vm)
            out.print(
                f"{vm.name}: ready in {ready['wall_s']:.2f} s (accel {vm.accel}, kernel {info.get('release')}, "
                f"paravisor {ready['guest_image']}); work dir {vm.workdir}"
            )
            if poweroff:
                b.powerdown(vm)
                outcome = b.wait_outcome(vm, 60)
                out.print(f"{vm.name}: powered off, SHUTDOWN reason {outcome.get('reason')}")
                if outcome.get("reason") != "guest-shutdown":
                    raise typer.Exit(3)
                return
            out.print("Ctrl-C to destroy it.")
            b.wait_outcome(vm, 10**7)
        except KeyboardInterrupt:
            pass
        finally:
            b.destroy(vm)


@vm_app.command("list")
def vm_list() -> None:
    """VMs with a lease on this machine (running or left by a dead owner).

    \b
    testbed vm list
    """
    t = Table("name", "qemu pid", "alive", "owner pid", "owner alive", "work dir")
    for _p, lease in leases.read_all(runtime_dir() / "leases"):
        if lease is None:
            continue
        t.add_row(
            lease.name,
            str(lease.qemu_pid),
            str(leases.alive(lease.qemu_pid, lease.qemu_start)),
            str(lease.owner_pid),
            str(leases.alive(lease.owner_pid, lease.owner_start)),
            lease.workdir,
        )
    out.print(t)


@vm_app.command("down")
def vm_down(name: Annotated[str, typer.Argument(help="VM name from 'testbed vm list'")]) -> None:
    """Kill a VM by its lease (SIGTERM, then SIGKILL) and remove the lease.

    \b
    testbed vm down reference-linux-myhost-4242-1
    """
    for p, lease in leases.read_all(runtime_dir() / "leases"):
        if lease is not None and lease.name == name:
            leases.kill_group(lease.qemu_pid, lease.qemu_start)
            p.unlink(missing_ok=True)
            out.print(f"{name}: stopped")
            return
    fail(2, f"no VM named {name!r}; see 'testbed vm list'")
