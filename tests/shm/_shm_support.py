"""Helpers of the shm tests: domain files and child processes (see ``_shm_child.py``)."""

from __future__ import annotations

import glob
import os
import selectors
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = str(Path(__file__).with_name("_shm_child.py"))


def domain_files(domain: str) -> list[str]:
    """Every file iceoryx2 made for ``domain`` (the 16-byte global_mgmt file excepted)."""
    found = glob.glob(f"/dev/shm/{domain}_*") + glob.glob(f"/tmp/iceoryx2/**/{domain}_*")
    return sorted(f for f in found if not f.endswith(".global_mgmt"))


def remove_domain(domain: str) -> None:
    """Remove every file of ``domain``, and node directories left empty."""
    for path in glob.glob(f"/dev/shm/{domain}_*") + glob.glob(f"/tmp/iceoryx2/**/{domain}_*"):
        try:
            os.remove(path)
        except OSError:
            pass
    for node_dir in glob.glob("/tmp/iceoryx2/nodes/*/"):
        try:
            if not os.listdir(node_dir):
                shutil.rmtree(node_dir, ignore_errors=True)
        except OSError:
            pass


class Child:
    """A child process from ``_shm_child.py``; killed at the end of the test."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, CHILD, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout: float = 30.0) -> str:
        """The next stdout line (raises if the child ends or stays silent)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
            if not sel.select(timeout):
                raise AssertionError(f"child silent for {timeout}s: {self.stderr()}")
        text = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not text:
            raise AssertionError(f"child ended: {self.stderr()}")
        return text.strip()

    def ready(self) -> Child:
        assert self.line() == "ready"
        return self

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        return (self.proc.stderr.read() or "")[-2000:]  # type: ignore[union-attr]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
