"""A complete store mounted read-only (a team's published models) can be read: status, a no-op
run of the whole graph and generation work, and nothing is written."""
import os
import sys

import commands
from conftest import TWO_RANKS


def read_only(cmd: list[str], store, mount) -> list[str]:
    """``cmd`` in a mount namespace of its own where ``mount`` is ``store`` bound read-only."""
    script = f'mount --bind "{store}" "{mount}" && mount -o remount,bind,ro "{mount}" && exec "$@"'
    userns = [] if os.geteuid() == 0 else ["--map-root-user"]
    return ["unshare", "--mount", *userns, "sh", "-c", script, "sh", *cmd]


def test_a_read_only_store_can_be_read(chain, tmp_path):
    mount = tmp_path / "store"
    mount.mkdir()
    env = {**chain.env, "PIPELINE_ARTIFACTS": str(mount)}
    probe = commands.run(read_only(["touch", str(mount / "x")], chain.artifacts, mount), check=False, env=env)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, "the bind mount is read-only"

    cache = chain.artifacts / ".cache" / "verified.json"
    cache.unlink(missing_ok=True)  # every file is then hashed, and the cache would be written
    status = commands.run(read_only([sys.executable, "-m", "tasks.status", *TWO_RANKS], chain.artifacts, mount),
                          env=env, cwd=chain.root)
    states = [line.split()[1] for line in status.stdout.splitlines()[1:] if not line.startswith(" ")]
    assert set(states) == {"up-to-date"}, status.stdout
    rerun = commands.run(read_only([sys.executable, "-m", "luigi", "--module", "tasks", "Report", *TWO_RANKS],
                                   chain.artifacts, mount), env=env, cwd=chain.root)
    assert "building in" not in rerun.stdout + rerun.stderr
    versions = sorted((chain.artifacts / "FinalCompressed").glob("*/compressed"))
    generate = commands.run(read_only([sys.executable, "-m", "pipeline.generate", "--model",
                                       str(mount / "FinalCompressed" / versions[0].parent.name), "--prompt", "def",
                                       "--max-new-tokens", "4"], chain.artifacts, mount), env=env, cwd=chain.root)
    assert "decode 3 tokens at" in generate.stdout, generate.stdout  # the first of 4 new tokens comes from the prefill
    assert not cache.exists(), "nothing was written to the read-only store"
