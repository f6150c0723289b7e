"""Implementation of the ``msight`` command line (not public API).

:mod:`msight_core.cli` parses arguments and dispatches here; each module owns
one command family and prints to the terminal (library code only logs).
"""
