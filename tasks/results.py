"""``python -m tasks.results [--out docs/results.md] [luigi overrides]`` (``make results``): the
measured results page, written from the manifests of the current graph's Report and what it
was built from (what ``make compress`` builds): the Report's tables as
its ``report.md`` has them, and every stage's version, build time and key figures. A figure on the
page is regenerated from an artifact, never retyped."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline import cli
from pipeline.artifacts import PROJECT_ROOT
from pipeline.cli import UsageError
from pipeline.report import report_lines
from tasks.status import current_graph, instance_label, open_store

# per stage, the metrics worth a column on the page (name in the manifest, how it is shown)
KEY_METRICS = {
    "Corpus": [("tokens_train", "{:,} train tokens"), ("tokens_valid", "{:,} valid tokens")],
    "BaseModel": [("valid_perplexity", "perplexity {:.2f}")],
    "ReluModel": [("valid_perplexity", "perplexity {:.2f}"), ("mean_ffn_sparsity", "{:.1%} zero activations")],
    "HiddenStates": [("tokens", "{:,} tokens")],
    "Routers": [("mean_router_coverage", "router coverage {:.3f}"),
                ("mean_groundtruth_coverage", "groundtruth {:.3f}")],
    "FinalCompressed": [("variant", "{}"), ("valid_perplexity", "perplexity {:.2f} as trained")],
}


def published_graph(specs, store) -> list:
    """(spec, artifact) for every stage of the current graph, verified; one sentence when a
    stage is not built."""
    found = []
    for spec in specs:
        artifact = store.get(spec.stage, spec.version)
        if artifact is None:
            raise UsageError(f"{spec.stage} {spec.version} of the current graph is not built; run make compress "
                             f"first (make status says what is missing)")
        store.verify(artifact)
        found.append((spec, artifact))
    return found


def stage_lines(graph, specs) -> list[str]:
    lines = ["| stage | version | build time | key figures |", "|---|---|---|---|"]
    for spec, artifact in graph:
        figures = [how.format(artifact.metrics[name]) for name, how in KEY_METRICS.get(spec.stage, [])
                   if artifact.metrics.get(name) is not None]
        seconds = artifact.manifest.get("timings", {}).get("total", 0.0)
        lines.append(f"| {spec.stage} {instance_label(spec, specs)} | {spec.version} | {seconds / 60:.1f} min | "
                     f"{'; '.join(figures)} |")
    total = sum(a.manifest.get("timings", {}).get("total", 0.0) for _, a in graph)
    return lines + ["", f"Build time of the whole graph, summed over its stages: {total / 60:.1f} min."]


def results_page(graph, specs) -> str:
    report = next(a for s, a in graph if s.stage == "Report")
    libraries = report.manifest.get("libraries", {})
    head = ["# Results", "",
            f"Written by `make results` from the manifests of the current graph (Report {report.version}, built "
            f"{report.manifest.get('created', '?')[:19].replace('T', ' ')} UTC; python {libraries.get('python')}, "
            f"torch {libraries.get('torch')}). Rerun it after `make compress` to refresh this page.", ""]
    body = report_lines(report.metrics, "The report")
    return "\n".join(head + ["## Stages", ""] + stage_lines(graph, specs) + [""] + [f"#{line}" if line.startswith("#")
                                                                                     else line for line in body]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.results", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "results.md", help="the page to write")
    args, overrides = p.parse_known_args(argv)
    try:
        with current_graph(overrides, ("Report",)) as stages:  # what make compress builds
            specs = [t.spec() for t in stages]
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    graph = published_graph(specs, open_store())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(results_page(graph, specs))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
