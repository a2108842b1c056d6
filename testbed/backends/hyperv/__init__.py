"""The Hyper-V backend: OpenHCL VMs on a Windows host; the host side is Testbed.psm1,
reached over WinRM, Windows OpenSSH or locally (and PowerShell Direct when nested)."""

OVERRIDE_VERSION_CHECKS = 0x1
DISABLE_NVME_KEEPALIVE = 0x10


def options(*, override_version_checks: bool = False, disable_nvme_keepalive: bool = False) -> int:
    """The ``Options`` bits of ReloadManagementVtl (CONTEXT.md: 0x1 and 0x10)."""
    return (OVERRIDE_VERSION_CHECKS if override_version_checks else 0) | (
        DISABLE_NVME_KEEPALIVE if disable_nvme_keepalive else 0
    )
