"""What the ``testbed`` commands do, behind ``testbed.cli`` (which only declares them and
their options): running a playbook (with its dry run and progress bar), comparing and
replaying runs, and the host commands."""
