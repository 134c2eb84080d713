"""docs/results.md is written from the manifests: every figure on the page comes from an
artifact, and a graph that is not built is refused, naming the stage."""
from pathlib import Path

import pytest

from pipeline.artifacts import Artifact, StageSpec
from pipeline.cli import UsageError
from pipeline.report import SPEEDS
from tasks.results import published_graph, results_page


def row(name, perplexity, ratio):
    speeds = {}
    for k in SPEEDS:
        speeds.update({f"{k}_tokens_per_s": 100.0 * ratio, f"{k}_teacher_tokens_per_s": 100.0,
                       f"{k}_speed_ratio": ratio, f"{k}_ratio_range": [ratio - 0.01, ratio + 0.01],
                       f"{k}_unsteady": False})
    return {"name": name, "perplexity": perplexity, "control_ratio": perplexity / 50.0, "perplexity_ratio": perplexity / 49.0,
            "kl": 0.01, "top1_agreement": 0.9, "greedy_agreement": 12.0, "bytes": 2**20, "size_ratio": 0.25,
            "what": f"{name} as built", **speeds}


def graph():
    specs = [StageSpec("BaseModel", {"model": "gpt-j-tiny"}, {}, {}), StageSpec("Report", {}, {}, {})]
    base = Artifact(Path("/s/BaseModel/a"), {"version": specs[0].version, "timings": {"total": 240.0},
                                             "metrics": {"valid_perplexity": 49.1834}})
    report = Artifact(Path("/s/Report/b"), {
        "version": specs[1].version, "timings": {"total": 60.0}, "created": "2026-12-08T03:00:00.000000+00:00",
        "libraries": {"python": "3.11.7", "torch": "2.13.0"},
        "metrics": {"rows": [row("teacher", 49.0, 1.0), row("control: KD, nothing compressed", 50.0, 1.0),
                             row("final: all four", 51.5, 1.37)],
                    "eval_tokens": 4096, "seq_len": 64, "rounds": 3, "threads": 2,
                    "control": "control: KD, nothing compressed"}})
    return specs, [(specs[0], base), (specs[1], report)]


def test_the_page_carries_the_manifests_figures():
    specs, built = graph()
    page = results_page(built, specs)
    assert f"Report {specs[1].version}, built 2026-12-08 03:00:00 UTC" in page
    assert f"| BaseModel  | {specs[0].version} | 4.0 min | perplexity 49.18 |" in page
    assert "Build time of the whole graph, summed over its stages: 5.0 min." in page
    assert "| final: all four | 51.50 | 1.030x |" in page  # 51.5 / 50, the control's ratio
    assert "1.37x (1.36-1.38) |" in page and ")†" not in page, "steady ratios carry no mark"
    assert "## The report" in page and "\n# The report" not in page, "the report's title sits under the page's"


def test_an_unbuilt_stage_is_refused_by_name():
    specs, _ = graph()

    class Empty:
        def get(self, stage, version):
            return None

    with pytest.raises(UsageError, match=f"BaseModel {specs[0].version} of the current graph is not built"):
        published_graph(specs, Empty())
