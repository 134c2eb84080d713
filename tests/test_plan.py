"""The plan before a run: every stage that would run with its estimates, the ones that do not fit
named, and ``make compress`` stopping before any work when one does not."""
import os
import subprocess
import sys

from conftest import ROOT, SMOKE_CFG


def plan(tmp_path, *args, **env):
    return subprocess.run([sys.executable, "-m", "tasks.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PIPELINE_ARTIFACTS": str(tmp_path / "store"),
                               "LUIGI_CONFIG_PATH": str(SMOKE_CFG), **env})


def test_the_plan_lists_every_stage_with_the_estimates_the_stages_use(tmp_path):
    proc = plan(tmp_path, "--tflops", "1")  # nothing built: every stage would run
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines()[2:-1]]
    assert rows.count("FinalCompressed") == 6 and rows.count("Routers") == 2 and len(rows) == 18, proc.stdout
    code = ("from luigi.cmdline_parser import CmdlineParser; import tasks\n"
            "with CmdlineParser.global_instance(['ReluModel']):\n"
            "    n = tasks.ReluModel().needs(); print(n.flops, n.rank_memory)")
    env = {**os.environ, "PIPELINE_ARTIFACTS": str(tmp_path / "store"), "LUIGI_CONFIG_PATH": str(SMOKE_CFG)}
    flops, rank_memory = map(float, subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                                                   capture_output=True, text=True).stdout.split())
    [relu] = [line for line in proc.stdout.splitlines() if line.startswith("ReluModel ")]
    assert relu.split()[-3] == f"{flops:.3g}" and flops > 1e9 and rank_memory > 0, relu


def test_a_stage_that_does_not_fit_is_named_and_make_compress_stops_before_any_work(tmp_path):
    proc = plan(tmp_path, "--check", PIPELINE_MEMORY_LIMIT_GB="0.000001")
    assert proc.returncode == 1 and "does not fit: Corpus needs" in proc.stdout, proc.stdout
    make = subprocess.run(["make", "-s", "compress"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PIPELINE_ARTIFACTS": str(tmp_path / "store"),
                               "LUIGI_CONFIG_PATH": str(SMOKE_CFG), "PIPELINE_MEMORY_LIMIT_GB": "0.000001"})
    assert make.returncode != 0 and "does not fit" in make.stdout
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").glob("*/*/manifest.json"))
