"""What a test shows when a command it ran fails: enough to diagnose it from one CI run."""
import os
import sys
import time

import pytest

import commands


def test_a_failed_command_reports_its_status_output_and_the_logs_it_wrote(tmp_path):
    store = tmp_path / "store"
    old = store / "Old" / "stage.log"
    old.parent.mkdir(parents=True)
    old.write_text("written before the command\n")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    script = ("import pathlib, sys; d = pathlib.Path(sys.argv[1]) / 'Stage/.scratch-x/resume/ranks/r/attempt_0/1';"
              "d.mkdir(parents=True); (d / 'stderr.log').write_text('\\n'.join(f'line {i}' for i in range(100)));"
              "print('out ' * 3); print('the cause', file=sys.stderr); sys.exit(3)")
    with pytest.raises(AssertionError) as e:
        commands.run([sys.executable, "-c", script, str(store)], roots=[store])
    text = str(e.value)
    assert "command: " in text and "exit status: 3" in text
    assert "--- its stdout" in text and "--- its stderr" in text and "the cause" in text
    rank_log = store / "Stage/.scratch-x/resume/ranks/r/attempt_0/1/stderr.log"
    assert f"--- {rank_log} (last {commands.TAIL_LINES} lines) ---" in text
    assert "line 99" in text and "line 39" not in text, "the tail of the rank's log, not all of it"
    assert str(old) not in text, "logs older than the command are not its own"


def test_a_command_past_its_timeout_is_reported_as_such(tmp_path):
    with pytest.raises(AssertionError) as e:
        commands.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"], timeout=2)
    assert "killed after the test's 2 s timeout" in str(e.value) and "started" in str(e.value)
