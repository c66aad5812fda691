"""Helpers shared by several test files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_fresh_interpreter(script: str, arguments: list[str], modules_dir: Path) -> dict:
    """Run `script` in a new Python process (offline, own module cache) and return its `REPORT` JSON line.

    The script prints one line `REPORT{...}`. transformers may print its trust_remote_code prompt without
    a newline, so the marker is searched inside lines.
    """
    environment = {**os.environ, "HF_MODULES_CACHE": str(modules_dir), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", script, *arguments],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if "REPORT" in line)
    return json.loads(line.split("REPORT", 1)[1])
