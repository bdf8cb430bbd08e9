"""The benchmark harness: timing, work models, ceilings, memory, providers, reports, the
regression gate and the ``fastattn-bench`` command. Nothing here runs or queries a device at
import; see ``fastattn/bench/cli.py`` for the command and DESIGN.md §4 for the contract."""
