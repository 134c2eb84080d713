"""How much a MoEfied model keeps: validation perplexity of the dense ReLU model against its MoE
versions at several top-k, with the trained routers, with groundtruth selection and on a random
split; written as a markdown report with one plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.evaluate import job
from pipeline.moefication.moe import load_moefied

FRACTIONS = (0.1, 0.2, 0.3, 0.5)
# name -> (which routers directory, selection)
SETTINGS = {"mlp_router": ("clustered", "router"), "groundtruth": ("clustered", "groundtruth"),
            "random_split": ("random", "router")}


def topk_for(fraction: float, num_expert: int) -> int:
    return max(1, min(num_expert, round(fraction * num_expert)))


def moe_jobs(relu: Path, routers: dict[str, Path], num_expert: int, fractions=FRACTIONS) -> list[dict]:
    """The evaluation jobs (``pipeline.evaluate.job``): the dense ReLU model, then every setting at
    every fraction."""
    from pipeline.models import from_pretrained

    jobs = [job("dense", from_pretrained, path=str(relu))]
    for fraction in fractions:
        topk = topk_for(fraction, num_expert)
        for name, (split, selection) in SETTINGS.items():
            jobs.append(job(f"{name} top-{topk}", load_moefied, path=str(relu), num_expert=num_expert, topk=topk,
                            routers=str(routers[split]), selection=selection))
    return jobs


def moe_table(results: dict[str, dict], num_expert: int, eval_tokens: int, fractions=FRACTIONS) -> dict:
    """The Moefied metrics from the jobs' results: the dense perplexity and, per fraction, each
    setting's perplexity and its ratio to the dense model."""
    def ppl(name):
        return round(results[name]["perplexity"], 4)

    dense = ppl("dense")
    rows = []
    for fraction in fractions:
        topk = topk_for(fraction, num_expert)
        row = {"fraction": fraction, "topk": topk}
        for name in SETTINGS:
            row[name] = ppl(f"{name} top-{topk}")
            row[f"{name}_ratio"] = round(row[name] / dense, 4)
        rows.append(row)
    return {"dense_perplexity": dense, "num_expert": num_expert, "eval_tokens": eval_tokens, "table": rows}


@torch.no_grad()
def sparse_vs_simulation(relu: Path, routers: Path, num_expert: int, topk: int, window: np.ndarray) -> float:
    """Largest absolute logit difference between the sparse path and the simulation (one model
    loaded at a time)."""
    ids = torch.from_numpy(window.astype(np.int64))[None]
    outs = [load_moefied(str(relu), num_expert, topk, str(routers), sparse=sparse)(ids) for sparse in (False, True)]
    return float((outs[0] - outs[1]).abs().max())


def write_report(metrics: dict, out: Path, title: str) -> None:
    """``report.md`` with the perplexity table and ``perplexity.png`` beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, dense = metrics["table"], metrics["dense_perplexity"]
    x = [100 * r["fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("mlp_router", "MLP router"), ("groundtruth", "groundtruth selection"),
                        ("random_split", "random split + MLP router")):
        ax.plot(x, [r[name] for r in rows], marker="o", label=label)
    ax.axhline(dense, color="gray", linestyle="--", label=f"dense ReLU model ({dense:.2f})")
    ax.set_xlabel("experts computed per token (%)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)

    lines = [f"# {title}", "",
             f"Validation perplexity on {metrics['eval_tokens']} tokens; dense ReLU model: **{dense:.2f}**. "
             f"{metrics['num_expert']} experts per layer. Ratios are to the dense model. Groundtruth selection "
             f"takes, per token and layer, the experts holding the most activation mass: it covers the most "
             f"mass any top-k can, but it is no bound on perplexity (a router can do better).", "",
             "| experts | top-k | MLP router | groundtruth | random split |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[n]:.2f} ({r[f'{n}_ratio']:.3f}x)" for n in SETTINGS]
        lines.append(f"| {100 * r['fraction']:.0f}% | {r['topk']} | " + " | ".join(cells) + " |")
    lines += ["", f"Sparse path against the simulation (top-{topk_for(0.2, metrics['num_expert'])}, one window): "
              f"largest logit difference {metrics['sparse_max_abs_diff']:.2e}.", "",
              "![perplexity against the share of experts](perplexity.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
