"""What one training step costs, per kind of run the pipeline trains, measured side by side in one
run: plain LM (BaseModel), distillation (ReluModel, the control), 2:4 masks held with distillation, int8 QAT, int8 QAT with
distillation, each in fp32 and under bf16 autocast; and the fused LM + distillation loss against
the same terms as separate autograd ops. Each configuration is timed in turns with the others
(rounds interleaved, medians), on the gpt-j-tiny shape with random weights.

    python bench/step_costs.py --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from kernels.int8 import cpu_product as int8_product
from pipeline import methods
from pipeline.losses import lm_and_soft_ce
from pipeline.models import GPTJ
from pipeline.models.gptj import lm_forward
from pipeline.models.presets import resolve_model

KINDS = ("LM", "KD", "2:4 + KD", "int8 QAT", "int8 QAT + KD")


def training_step(kind: str, dtype: torch.dtype | None, model_name: str, batch: torch.Tensor):
    torch.manual_seed(0)
    config, _ = resolve_model(model_name)
    model = GPTJ(config).train()
    if "int8" in kind:
        methods.use("quant").BMQuant.quantize(model, grad="float")
    forward = lambda x, y: lm_forward(model, x, y)  # noqa: E731
    if "KD" in kind:
        distill = methods.use("distill")
        forward = distill.BMDistill.set_forward(model, GPTJ(config), lm_forward, ce_logits=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if "2:4" in kind:
        prune = methods.use("prune").BMPrune
        prune.compute_mask(model, "m4n2_2d_best")
        prune.set_optim_for_pruning(opt, model)
    x, y = batch[:, :-1], batch[:, 1:]

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = forward(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def separate_losses(logits, targets, teacher):
    lm = F.cross_entropy(logits, targets)
    kd = -(F.softmax(teacher, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
    return lm + kd


def timed(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per configuration per round")
    p.add_argument("--model", default="gpt-j-tiny")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="time bf16 autocast too (auto: only where the CPU has native bf16; emulated it is slow)")
    args = p.parse_args()
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    dtypes = (None, torch.bfloat16) if args.bf16 == "on" or (args.bf16 == "auto" and native) else (None,)
    config, _ = resolve_model(args.model)
    batch = torch.randint(0, config.vocab_size, (16, 129), generator=torch.Generator().manual_seed(0))
    runs = {(k, d): training_step(k, d, args.model, batch) for k in KINDS for d in dtypes}
    logits = torch.randn(16 * 128, config.vocab_size)
    teacher, targets = torch.randn_like(logits), batch[:, 1:].reshape(-1)

    def loss_step(fused):
        s = logits.clone().requires_grad_()
        (lm_and_soft_ce(s, targets, teacher)[0] if fused else separate_losses(s, targets, teacher)).backward()
    runs[("loss", "fused")], runs[("loss", "separate")] = (lambda: loss_step(True)), (lambda: loss_step(False))
    for fn in runs.values():  # warm-up
        fn()
    times = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, fn in runs.items():
            times[key].append(timed(fn, args.steps))
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    print(f"{args.model}, batch 16 x 128, {torch.get_num_threads()} threads on {os.cpu_count()} cores, "
          f"bf16 native: {native}; int8 product {int8_product()}; "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'step':16s} {'fp32 ms':>8s} {'/ LM fp32':>9s} {'bf16 ms':>8s} {'fp32/bf16':>9s}")
    for kind in KINDS:
        fp32, bf16 = med[(kind, None)], med.get((kind, torch.bfloat16))
        line = f"{kind:16s} {fp32:8.0f} {fp32 / med[('LM', None)]:8.2f}x"
        print(line + (f" {bf16:8.0f} {fp32 / bf16:8.2f}x" if bf16 else "  (bf16 not timed)"))
    fused, separate = med[("loss", "fused")], med[("loss", "separate")]
    print(f"LM + KD loss on {tuple(logits.shape)} logits, forward and backward: fused {fused:.1f} ms, separate "
          f"autograd ops {separate:.1f} ms ({separate / fused:.2f}x)")


if __name__ == "__main__":
    main()
