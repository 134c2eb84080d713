"""Commands run by tests, and what a test prints when one fails: the command, its exit status, the
tail of its output and the tail of every log the pipeline wrote while it ran (each stage's
``stage.log``, the training's ``train.log``, every torchrun rank's ``stdout.log`` and
``stderr.log``), so that one failed CI run is enough to see why."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

TAIL_LINES = 60


def tail(text: str, lines: int = TAIL_LINES) -> str:
    kept = text.splitlines()[-lines:]
    return "\n".join(kept)


def logs_written(roots, since: float) -> list[Path]:
    """Every ``*.log`` under ``roots`` modified at or after ``since``, oldest first."""
    found = []
    for root in roots:
        root = Path(root)
        if root.is_dir():
            found += [p for p in root.rglob("*.log") if p.is_file() and p.stat().st_mtime >= since - 1]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def report(cmd, returncode, stdout: str, stderr: str = "", roots=(), since: float = 0.0) -> str:
    """The failure of ``cmd`` as one readable block: the command, how it ended, the tails of its
    stdout and stderr and of every log under ``roots`` written since ``since``."""
    cmd_text = " ".join(str(c) for c in cmd) if not isinstance(cmd, str) else cmd
    parts = [f"command: {cmd_text}", f"exit status: {returncode}"]
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if text:
            parts += [f"--- its {name} (last {TAIL_LINES} lines) ---", tail(text)]
    for log in logs_written(roots, since):
        try:
            text = log.read_text(errors="replace")
        except OSError as e:  # removed since it was listed (a publish moved it)
            text = f"<unreadable: {e}>"
        parts += [f"--- {log} (last {TAIL_LINES} lines) ---", tail(text)]
    return "\n".join(parts)


def run(cmd, *, roots=(), check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with the output captured as text; with ``check``, a non-zero exit or a
    timeout fails the test with ``report``."""
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(report(cmd, f"killed after the test's {timeout} s timeout", _text(e.stdout),
                                    _text(e.stderr), roots, start)) from None
    if check and proc.returncode != 0:
        raise AssertionError(report(cmd, proc.returncode, proc.stdout, proc.stderr, roots, start))
    return proc


def assert_ok(proc: subprocess.CompletedProcess, roots=(), since: float = 0.0) -> None:
    """For a command run elsewhere: fail with ``report`` unless it exited 0."""
    if proc.returncode != 0:
        raise AssertionError(report(proc.args, proc.returncode, _text(proc.stdout), _text(proc.stderr),
                                    roots, since))


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
