"""The QEMU backend: reference-lab guests on this machine or a Linux host over SSH."""
