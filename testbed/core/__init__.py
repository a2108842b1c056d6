"""The bottom layer: verdicts and their decision table, errors, YAML models with lines,
plan and evidence types, declared capabilities and the run-folder format.

It imports nothing else of testbed, and its modules that run on lab hosts (paths,
redact) stay valid on Python 3.9 and free of third-party imports."""
