"""The OpenVMM backend: OpenHCL on OpenVMM (Windows, WHP), servicing and the shutdown IC
through openvmm's interactive console, timed on the host by ``hostside.py``."""
