"""The comparison report: every variant's perplexity, fidelity to the teacher, file size and CPU
speed, measured in one run, with plots of the training curves, activation sparsity, router
coverage, perplexity against size and fidelity."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.decode import use_c_attention
from pipeline.evaluate import NEW_TOKENS as GREEDY_TOKENS, PROMPTS as GREEDY_PROMPTS

PREFILL_TOKENS = (16, 128)  # prompt lengths whose prefill is timed
DECODE_CONTEXT, DECODE_TOKENS = 128, 16  # batch-1 decoding: this many tokens after a prompt this long
SPEEDS = tuple(f"prefill_{n}" for n in PREFILL_TOKENS) + ("decode",)
# past this spread of a ratio's per-round values ((max - min) / median), machine noise, not the model, decides it
SPREAD_MARGIN = 0.25
UNSTEADY_MARK = "\u2020"  # the report's mark on such a ratio


def per_second(tokens: float, seconds: float) -> float:
    """``tokens`` over ``seconds``: a zero, negative or non-finite time is an error, never an inf or NaN figure."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"a timed call took {seconds!r} s: tokens per second need a positive, finite time")
    return tokens / seconds


def decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per token of ``steps`` cached decoding steps after prefilling ``prompt``."""
    model.setup_caches(1, prompt.shape[1] + steps)
    model(prompt, input_pos=torch.arange(prompt.shape[1]))
    token = prompt[:, -1:]
    start = time.perf_counter()
    for p in range(prompt.shape[1], prompt.shape[1] + steps):
        token = model(token, input_pos=torch.tensor([p]))[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def serving_rounds(models: dict, vocab: int, rounds: int = 7, calls: int = 3, seed: int = 0) -> dict[str, dict]:
    """CPU tokens per second of every model as served, per round: the prefill of one prompt of each length
    in ``PREFILL_TOKENS``, and batch-1 decoding with the KV cache (``DECODE_TOKENS`` tokens after
    a ``DECODE_CONTEXT``-token prompt, shortened to fit n_positions), every model's attention steps
    in C where the kernels exist (``pipeline.decode``). The models take turns within
    every round (so machine noise hits all alike); ``{name: {kind: [tokens/s of each round]}}``,
    the warm-up round left out, so that a caller can pair the models' figures round by round."""
    for model in models.values():  # every model decodes on the same attention path
        use_c_attention(model)
    gen = torch.Generator().manual_seed(seed)
    first = next(iter(models.values()))
    context = min(DECODE_CONTEXT, first.config.n_positions - DECODE_TOKENS)
    prompts = {n: torch.randint(0, vocab, (1, min(n, first.config.n_positions)), generator=gen) for n in PREFILL_TOKENS}
    context_ids = torch.randint(0, vocab, (1, context), generator=gen)
    times: dict = {name: {k: [] for k in SPEEDS} for name in models}
    for _ in range(rounds + 1):  # the first round warms up: packing, allocator, first-call dispatch
        for name, model in models.items():
            for n, ids in prompts.items():
                start = time.perf_counter()
                for _ in range(calls):
                    model(ids)
                times[name][f"prefill_{n}"].append(per_second(ids.shape[1] * calls, time.perf_counter() - start))
            times[name]["decode"].append(per_second(1, decode_seconds(model, context_ids, DECODE_TOKENS)))
    return {name: {k: v[1:] for k, v in per.items()} for name, per in times.items()}


def serving_speed(models: dict, vocab: int, rounds: int = 7, calls: int = 3, seed: int = 0) -> dict[str, dict]:
    """``serving_rounds``'s figures as each model's median over the rounds: ``{name: {kind: tokens/s}}``."""
    per_round = serving_rounds(models, vocab, rounds=rounds, calls=calls, seed=seed)
    return {name: {k: float(np.median(v)) for k, v in per.items()} for name, per in per_round.items()}


def _rates(values, what: str) -> np.ndarray:
    rates = np.asarray(values, dtype=np.float64)
    if rates.size == 0 or not (np.all(np.isfinite(rates)) and np.all(rates > 0)):
        raise ValueError(f"{what}: per-round tokens per second must be positive and finite, got {list(values)}")
    return rates


def paired_figures(rates, teacher_rates, margin: float = SPREAD_MARGIN) -> dict:
    """A row's speed figures from its tokens per second in each round and the teacher's in the same
    rounds of the same pairing: both medians, the median of the per-round ratios (row / teacher),
    their [min, max], and whether (max - min) / median exceeds ``margin`` (unsteady)."""
    rates, teacher_rates = _rates(rates, "the row"), _rates(teacher_rates, "the teacher")
    if rates.shape != teacher_rates.shape:
        raise ValueError(f"{rates.size} rounds of the row against {teacher_rates.size} of the teacher: rounds must pair")
    ratios = rates / teacher_rates
    ratio, low, high = float(np.median(ratios)), float(ratios.min()), float(ratios.max())
    return {"tokens_per_s": round(float(np.median(rates)), 1),
            "teacher_tokens_per_s": round(float(np.median(teacher_rates)), 1),
            "speed_ratio": round(ratio, 3), "ratio_range": [round(low, 3), round(high, 3)],
            "unsteady": bool((high - low) / ratio > margin)}


def alone_figures(rates, margin: float = SPREAD_MARGIN) -> dict:
    """The teacher's own figures, timed alone: ratio 1 by definition, its range and steadiness
    those of its rounds about their median."""
    median = float(np.median(_rates(rates, "the teacher")))
    return {**paired_figures(rates, [median] * len(rates), margin), "speed_ratio": 1.0}


def speed_figures(teacher, name: str, model, vocab: int, rounds: int) -> dict:
    """``{kind}_{figure}`` of ``paired_figures`` for every kind in ``SPEEDS``: the model measured in
    turns with the teacher, or the teacher alone (``alone_figures``)."""
    if model is teacher:
        per = serving_rounds({"teacher": teacher}, vocab, rounds=rounds)["teacher"]
        figures = {k: alone_figures(per[k]) for k in SPEEDS}
    else:
        per = serving_rounds({"teacher": teacher, name: model}, vocab, rounds=rounds)
        figures = {k: paired_figures(per[name][k], per["teacher"][k]) for k in SPEEDS}
    return {f"{k}_{key}": value for k, f in figures.items() for key, value in f.items()}


FIDELITY = ("kl", "top1_agreement", "greedy_agreement")  # against the teacher (pipeline.evaluate.run_jobs)


def measure_rows(teacher, rows, evaluations: dict[str, dict], vocab: int, rounds: int) -> list[dict]:
    """Per row ``(name, job, bytes, what)`` (the first row is the teacher's): its perplexity and
    fidelity to the teacher (from ``evaluations``), and its serving speed measured in turns with
    the teacher's, with the teacher's in that same pairing (``speed_figures``). One variant is
    loaded (``pipeline.evaluate.load_job_model``) at a time and freed before the next, so that no
    more than two models, the teacher and it, are ever held."""
    import gc

    from pipeline.evaluate import load_job_model

    results = []
    for name, spec, nbytes, what in rows:
        model = teacher if name == "teacher" else load_job_model(spec)
        result = {"name": name, "perplexity": round(evaluations[name]["perplexity"], 4), "bytes": nbytes, "what": what,
                  **{k: round(evaluations[name][k], 5) for k in FIDELITY if k in evaluations[name]}}
        result.update(speed_figures(teacher, name, model, vocab, rounds))
        results.append(result)
        del model
        gc.collect()
    return results


def compare(rows: list[dict], control: str) -> list[dict]:
    """``rows`` (the teacher's first) with each perplexity's ratio to the teacher's and to the
    ``control`` row's, and each size's ratio to the teacher's."""
    teacher, matched = rows[0], next(r for r in rows if r["name"] == control)
    for r in rows:
        r.update(perplexity_ratio=round(r["perplexity"] / teacher["perplexity"], 4),
                 control_ratio=round(r["perplexity"] / matched["perplexity"], 4),
                 size_ratio=round(r["bytes"] / teacher["bytes"], 4))
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: list[float], window: int) -> np.ndarray:
    """The trailing mean over ``window`` points (over fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def loss_terms(curve: list) -> dict[str, tuple[list[int], list[float]]]:
    """{term: (steps, values)} of a training stage's loss curve (``[step, total, {term: value}]``
    entries): the LM loss and each distillation or penalty term, unscaled."""
    terms: dict[str, tuple[list[int], list[float]]] = {}
    for entry in curve:
        for name, value in (entry[2] if len(entry) > 2 else {}).items():
            steps, values = terms.setdefault(name, ([], []))
            steps.append(entry[0])
            values.append(value)
    return terms


def plot_loss_curves(curves: dict[str, list], out: Path) -> None:
    """The LM loss of every training stage on the left, its distillation and penalty terms on the
    right: each smoothed, the raw points faint behind."""
    plt = _plt()
    fig, (lm, others) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, curve) in enumerate((n, c) for n, c in curves.items() if c):
        color = f"C{i % 10}"
        for term, (steps, values) in loss_terms(curve).items():
            ax, label = (lm, name) if term == "lm" else (others, f"{name}: {term}")
            style = {} if term in ("lm", "kd_ce_logits") else {"linestyle": "--"}
            ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8, **style)
            ax.plot(steps, smooth(values, max(1, len(values) // 8)), color=color, label=label, **style)
    lm.set_title("LM loss (next-token cross-entropy)")
    others.set_title("distillation and penalty terms (unscaled)")
    for ax in (lm, others):
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("Training loss of every training stage, smoothed (raw points faint)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_layers(series: dict[str, list], ylabel: str, title: str, out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        ax.plot(range(len(values)), values, marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_perplexity_size(rows: list[dict], out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.scatter(r["bytes"] / 2**20, r["perplexity"])
        ax.annotate(r["name"], (r["bytes"] / 2**20, r["perplexity"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("file size on disk (MiB)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity against size")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_fidelity(rows: list[dict], out: Path) -> None:
    """Per row, its top-1 agreement with the teacher and its greedy agreement (share of the
    generated tokens), and its KL divergence from the teacher."""
    plt = _plt()
    rows = [r for r in rows if "kl" in r]
    names, at = [r["name"] for r in rows], np.arange(len(rows))
    fig, (agree, kl) = plt.subplots(1, 2, figsize=(12, 4.5))
    agree.bar(at - 0.2, [r["top1_agreement"] for r in rows], 0.4, label="top-1 agreement")
    agree.bar(at + 0.2, [r["greedy_agreement"] / GREEDY_TOKENS for r in rows], 0.4,
              label=f"greedy agreement (share of {GREEDY_TOKENS} tokens before the first difference)")
    agree.set_ylim(0, 1.05)
    kl.bar(at, [r["kl"] for r in rows])
    kl.set_ylabel("mean KL(teacher || model) per token, nats")
    agree.set_title("agreement with the teacher")
    kl.set_title("divergence from the teacher")
    for ax in (agree, kl):
        ax.set_xticks(at, names, rotation=35, ha="right", fontsize=7)
    agree.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


PLOTS = {"loss_curves.png": "training loss curves", "ffn_sparsity.png": "per-layer activation sparsity",
         "router_coverage.png": "router coverage per layer", "perplexity_size.png": "perplexity against size",
         "fidelity.png": "fidelity to the teacher"}


def harness_table(rows: list[dict]) -> list[str]:
    """The lm-evaluation-harness scores of every row, one column per task and metric (none: no lines)."""
    columns = [(task, metric) for task, metrics in rows[0].get("harness", {}).items() for metric in metrics
               if metric != "sample_len"]
    if not columns:
        return []
    lines = ["", "lm-evaluation-harness (`harness_tasks`), every row through `pipeline.harness.PipelineLM`:", "",
             "| model | " + " | ".join(f"{t}: {m}" for t, m in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['harness'][t][m]:.4g}" for t, m in columns) + " |")
    return lines


def speed_cells(r: dict, k: str) -> str:
    """A row's tokens/s of speed kind ``k``, the teacher's in the same pairing, and the ratio with the
    range of its per-round values, marked when unsteady: ``1180 | 1100 | 1.07x (0.41-1.52)†``."""
    low, high = r[f"{k}_ratio_range"]
    mark = UNSTEADY_MARK if r[f"{k}_unsteady"] else ""
    return (f"{r[f'{k}_tokens_per_s']:.0f} | {r[f'{k}_teacher_tokens_per_s']:.0f} | "
            f"{r[f'{k}_speed_ratio']:.2f}x ({low:.2f}-{high:.2f}){mark}")


def speed_table(rows: list[dict]) -> list[str]:
    """Per row its file size and, per kind in ``SPEEDS``, its ``speed_cells``; the mark explained below."""
    lines = ["| model | file size | vs teacher | "
             + " | ".join(f"{k.replace('_', ' ')} tok/s | teacher tok/s | vs teacher" for k in SPEEDS) + " |",
             "|---" * (3 + 3 * len(SPEEDS)) + "|"]
    for r in rows:
        speeds = " | ".join(speed_cells(r, k) for k in SPEEDS)
        lines.append(f"| {r['name']} | {r['bytes'] / 2**20:.2f} MiB | {r['size_ratio']:.3f}x | {speeds} |")
    return lines + ["", f"{UNSTEADY_MARK} marks a ratio whose per-round values spread (highest minus lowest) by "
                        f"more than {SPREAD_MARGIN:.0%} of their median: the machine's noise was too large for it "
                        f"to be trusted."]


def write_markdown(metrics: dict, out: Path, title: str) -> None:
    lines = report_lines(metrics, title)
    lines += [f"![{caption}]({name})" for name, caption in PLOTS.items()] + [""]
    (out / "report.md").write_text("\n".join(lines))


def report_lines(metrics: dict, title: str) -> list[str]:
    """The report's text from the Report's manifest metrics: the quality and speed tables, harness
    scores and what each row is (``tasks.results`` writes the same into docs/results.md)."""
    rows, control = metrics["rows"], metrics["control"]
    lines = [f"# {title}", "",
             f"Every model on the same {metrics['eval_tokens']} validation tokens (windows of {metrics['seq_len']}). "
             f"**vs control** is the ratio to *{control}*: the teacher fine-tuned with the same recipe, steps, data "
             f"and distillation as the compressed runs, nothing compressed; it measures what compression costs. "
             f"**vs teacher** adds what the extra training gained. Fidelity, on the same windows: the mean "
             f"per-token KL divergence of the model's next-token distribution from the teacher's, the share of "
             f"positions where both rank the same token first, and over {GREEDY_PROMPTS} prompts from the "
             f"validation split the mean number of greedily generated tokens identical to the teacher's before "
             f"the first difference (of {GREEDY_TOKENS}).", "",
             "| model | perplexity | vs control | vs teacher | KL from teacher | top-1 agreement | greedy agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {r['control_ratio']:.3f}x | {r['perplexity_ratio']:.3f}x | "
                     f"{r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['greedy_agreement']:.1f} / {GREEDY_TOKENS} |")
    lines += ["", f"Size and serving speed on the CPU, {metrics['threads']} torch threads: tokens per second of the "
              f"prefill of a {PREFILL_TOKENS[0]}- and a {PREFILL_TOKENS[1]}-token prompt, and of batch-1 decoding "
              f"with the KV cache ({DECODE_TOKENS} tokens after a {DECODE_CONTEXT}-token prompt); each model "
              f"measured in turns with the teacher over {metrics['rounds']} rounds, one variant held at a time. "
              f"**teacher tok/s** is the teacher's median in that same pairing, and **vs teacher** the median over "
              f"the rounds of the row's speed over the teacher's in the same round, with the lowest and highest "
              f"of those per-round ratios in brackets. The teacher's own row is the teacher timed alone: ratio 1, "
              f"the brackets its rounds' spread about their median.", "", *speed_table(rows)]
    lines += harness_table(rows)
    return lines + [""] + [f"- **{r['name']}**: {r['what']}" for r in rows] + [""]
