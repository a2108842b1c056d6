"""testbed: race tests of paravisor servicing against vmbus messages, on real virtual hardware."""

__version__ = "0.1.0"
