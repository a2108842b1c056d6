"""The reference guest image: a Debian kernel plus a busybox initramfs with the lab programs.

Built from Debian packages (``apt-get download`` + ``dpkg-deb``), never from a
hard-coded kernel ABI: the metapackage named in the vm_config is resolved at
build time, unless the config pins a version. The result is cached under a key
that hashes every input, so the same inputs give a cache hit and a changed
guest program gives a new image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from testbed.backends.qemu.config import PARAVISOR_IMAGES, QemuVmConfig
from testbed.backends.qemu.cpio import write_newc
from testbed.core.errors import InfraError
from testbed.core.paths import cache_dir

log = logging.getLogger(__name__)

BUILDER_VERSION = "1"
# virtio-serial stack in load order, then pvpanic (ISA, via ACPI) and the power button.
WANTED_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "pvpanic",
    "pvpanic-mmio",
    "button",
    "evdev",
)


class ImageBuildError(InfraError):
    """The image could not be built; the message says which tool or package failed."""


@dataclass(frozen=True)
class Image:
    """A built image: what QEMU boots, and the manifest that says what is in it."""

    directory: Path
    kernel: Path
    initrd: Path
    manifest: dict[str, str]

    @property
    def key(self) -> str:
        return self.manifest["key"]


TOOL_TIMEOUT_S = 600  # apt-cache, apt-get download, dpkg-deb: none should wait without end


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=TOOL_TIMEOUT_S)
    except FileNotFoundError:
        raise ImageBuildError(f"{cmd[0]} not found: apt-get install {_provider(cmd[0])}") from None
    except subprocess.TimeoutExpired:
        raise ImageBuildError(
            f"{' '.join(cmd)} did not finish within {TOOL_TIMEOUT_S} s (apt lock, mirror?)"
        ) from None
    if p.returncode != 0:
        raise ImageBuildError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    return p.stdout


def _provider(tool: str) -> str:
    return {"gcc": "gcc libc6-dev", "apt-cache": "apt", "dpkg-deb": "dpkg"}.get(tool, tool)


def apt_show(spec: str) -> dict[str, str]:
    """Fields of ``apt-cache show --no-all-versions spec`` (spec may be pkg=version)."""
    out = _run(["apt-cache", "show", "--no-all-versions", spec])
    fields: dict[str, str] = {}
    for line in out.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if ":" in line and not line.startswith(" "):
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    if "Version" not in fields:
        raise ImageBuildError(
            f"apt knows no package {spec!r}: run apt-get update, or fix kernel.package/version"
        )
    return fields


def resolve_kernel(package: str, version: str | None) -> tuple[str, str]:
    """Metapackage (optionally pinned) -> (concrete kernel package, its version)."""
    spec = f"{package}={version}" if version else package
    f = apt_show(spec)
    deps = [d.strip().split(" ")[0] for d in f.get("Depends", "").split(",")]
    concrete = [d for d in deps if re.match(r"linux-image-\d", d)]
    if not concrete:
        return package, f["Version"]  # already a concrete kernel package
    c = apt_show(concrete[0])
    return concrete[0], c["Version"]


def _download(package: str, version: str) -> Path:
    """The .deb of package=version, from the package cache or apt-get download."""
    debs = cache_dir() / "debs"
    debs.mkdir(exist_ok=True)
    safe_version = version.replace(":", "%3a")
    for cand in debs.glob(f"{package}_{safe_version}_*.deb"):
        return cand
    _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=debs)
    for cand in debs.glob(f"{package}_{safe_version}_*.deb"):
        return cand
    raise ImageBuildError(f"apt-get download {package}={version} produced no .deb")


def _modinfo_depends(ko: Path) -> list[str]:
    m = re.search(rb"depends=([^\x00]*)\x00", ko.read_bytes())
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def _module_closure(modroot: Path) -> list[Path]:
    """WANTED_MODULES and their dependencies, dependencies first; built-ins skipped."""
    index = {p.name.removesuffix(".ko").replace("-", "_"): p for p in modroot.rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str) -> None:
        p = index.get(name.replace("-", "_"))
        if p is None or p in order:
            return  # built into this kernel, or already placed
        for dep in _modinfo_depends(p):
            visit(dep)
        order.append(p)

    for m in WANTED_MODULES:
        visit(m)
    return order


def guest_sources() -> dict[str, bytes]:
    pkg = resources.files("testbed.lab.guest")
    return {n: (pkg / n).read_bytes() for n in ("paravisor.c", "init.sh")}


def _gcc_version() -> str:
    return _run(["gcc", "-dumpfullversion"]).strip()


@dataclass(frozen=True)
class ImageInputs:
    kernel_package: str
    kernel_version: str
    busybox_version: str
    gcc_version: str
    cmdline: str
    sources_sha: str

    def key(self) -> str:
        blob = json.dumps({"builder": BUILDER_VERSION, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def resolve_inputs(cfg: QemuVmConfig) -> ImageInputs:
    kpkg, kver = resolve_kernel(cfg.kernel.package, cfg.kernel.version)
    bb = apt_show(cfg.busybox_package)["Version"]
    src = hashlib.sha256()
    for name, data in sorted(guest_sources().items()):
        src.update(name.encode() + b"\0" + data)
    return ImageInputs(kpkg, kver, bb, _gcc_version(), cfg.cmdline, src.hexdigest())


def cached_image(key: str) -> Image | None:
    d = cache_dir() / "images" / key
    mf = d / "manifest.json"
    if not mf.exists():
        return None
    manifest = json.loads(mf.read_text())
    return Image(d, d / "vmlinuz", d / "initrd.cpio", manifest)


@dataclass(frozen=True)
class _Kernel:
    """What the image takes from the kernel package: the kernel itself and its modules."""

    vmlinuz: Path
    release: str
    modules: list[Path]


def _unpack(cfg: QemuVmConfig, inputs: ImageInputs, work: Path) -> tuple[Path, Path, Path]:
    """Download the kernel and busybox .debs and extract both under ``work``.

    Returns (kernel .deb, kernel tree, busybox tree); the .deb's name is for error messages."""
    kdeb = _download(inputs.kernel_package, inputs.kernel_version)
    bdeb = _download(cfg.busybox_package, inputs.busybox_version)
    kx = work / "kernel"
    _run(["dpkg-deb", "-x", str(kdeb), str(kx)])
    bx = work / "busybox"
    _run(["dpkg-deb", "-x", str(bdeb), str(bx)])
    return kdeb, kx, bx


def _kernel_parts(kdeb: Path, kx: Path) -> _Kernel:
    """The kernel, its release and the module closure, refusing a kernel the guest can't talk on:
    without virtio_console (module or built-in) the lab's channel never appears."""
    vmlinuz = next((kx / "boot").glob("vmlinuz-*"), None)
    if vmlinuz is None:
        raise ImageBuildError(f"{kdeb.name} has no /boot/vmlinuz-*: is it a kernel image?")
    kernel_release = vmlinuz.name.removeprefix("vmlinuz-")
    modules = _module_closure(kx / "lib" / "modules")
    config = next((kx / "boot").glob("config-*"), None)
    builtin = config.read_text() if config else ""
    if "virtio_console" not in {p.stem for p in modules} and "CONFIG_VIRTIO_CONSOLE=y" not in builtin:
        raise ImageBuildError(f"kernel {kernel_release} has no virtio_console (module or built-in)")
    return _Kernel(vmlinuz, kernel_release, modules)


def _compile_paravisor(work: Path, source: bytes) -> Path:
    """The guest's paravisor, built static: the initramfs has no libc to link against."""
    (work / "paravisor.c").write_bytes(source)
    pv = work / "paravisor"
    _run(["gcc", "-O2", "-static", "-o", str(pv), str(work / "paravisor.c")])
    return pv


def _assemble_root(root: Path, busybox: Path, init: bytes, modules: list[Path], pv: Path) -> None:
    """Lay out the initramfs tree: busybox, /init, the modules in load order, and the
    paravisor under every image name the servicing requests may ask for."""
    for d in (
        "bin",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "lib/testbed/modules",
        "lib/testbed/images",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    (root / "init").write_bytes(init)
    (root / "init").chmod(0o755)
    for ko in modules:
        shutil.copy2(ko, root / "lib/testbed/modules" / ko.name)
    (root / "lib/testbed/modules.order").write_text("".join(ko.stem + "\n" for ko in modules))
    shutil.copy2(pv, root / "lib/testbed/paravisor")
    for name in PARAVISOR_IMAGES:
        os.symlink("../paravisor", root / "lib/testbed/images" / name)


def _write_output(out: Path, key: str, inputs: ImageInputs, kernel: _Kernel, root: Path) -> None:
    """Write what QEMU boots (vmlinuz, initrd.cpio) and the manifest saying what is in it."""
    out.mkdir()
    shutil.copy2(kernel.vmlinuz, out / "vmlinuz")
    write_newc(root, out / "initrd.cpio", devices={"dev/console": (5, 1)})
    manifest = {
        "key": key,
        **{k: str(v) for k, v in inputs.__dict__.items()},
        "kernel_release": kernel.release,
        "modules": ",".join(ko.stem for ko in kernel.modules),
        "paravisor_images": ",".join(PARAVISOR_IMAGES),
        "initrd_sha256": hashlib.sha256((out / "initrd.cpio").read_bytes()).hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def build_image(cfg: QemuVmConfig, force: bool = False) -> Image:
    """Build (or fetch from cache) the reference image for ``cfg``.

    Built in a temporary directory next to the cache and moved in whole, so an
    interrupted build never leaves a half image under its key."""
    inputs = resolve_inputs(cfg)
    key = inputs.key()
    if not force and (img := cached_image(key)) is not None:
        log.info("image cache hit %s", key)
        return img
    final = cache_dir() / "images" / key
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        work = Path(tmp)
        kdeb, kx, bx = _unpack(cfg, inputs, work)
        kernel = _kernel_parts(kdeb, kx)
        sources = guest_sources()
        pv = _compile_paravisor(work, sources["paravisor.c"])
        root = work / "root"
        _assemble_root(root, bx / "bin" / "busybox", sources["init.sh"], kernel.modules, pv)
        out = work / "out"
        _write_output(out, key, inputs, kernel, root)
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    img = cached_image(key)
    assert img is not None
    return img
