"""The compressed model's layers against fp32, side by side in one run, at GPT-J size.

One GPT-J block's linear layers: the four attention projections (4096 x 4096) and the FFN
(4096 -> 16384 -> 4096, 512 experts of 32 neurons). Compared for 1 and 16 tokens of one sequence
("shared" routing: one random vector plus 0.3x noise per token, so neighbouring tokens mostly
choose the same experts):

* fp32: ``F.linear`` for the projections, the dense FFN;
* int8: fbgemm's int8 GEMM (``pipeline.quant.Int8Linear``) for the projections and the dense FFN;
* int8 MoE: ``pipeline.compressed.Int8MoEFFN`` at top-20%, router included, which gathers the
  chosen experts' int8 rows into one integer GEMM (oneDNN ``torch._int_mm``), or runs the dense
  int8 FFN with the experts' mask when the tokens choose half of the experts or more;
* int8 MoE, gathered (1 token): the compiled weight-only gather (``gathered_ffn``), which reads
  the chosen experts' rows in place, one GEMV each way;
* int8 MoE, bagged (1 token): the same two GEMVs on fbgemm's embedding-bag kernel
  (``kernels.bagged``);
* int8 MoE, C (gemv): the sparse path in C (``kernels.moe_gemv``), which reads each chosen
  expert's int8 rows in place, once for all the tokens that chose it, in QAT's arithmetic.

Then batch-1 decoding with the KV cache at context ``--context`` of a one-block GPT-J-width model
(a 512-token vocabulary, so the block dominates) in fp32, int8 and int8 + MoE as exported (the
export measures which MoE path each call size takes).

``--model COMPRESSED --teacher DIR`` instead measures a pipeline model's serving speed against
its teacher (``pipeline.report.serving_speed``), with each of its MoE decode paths.

Every call takes the next of ``--layers`` weight sets, as a deep model would, so weights come from
memory rather than from a cache that still holds them. The model-level comparison on
gpt-j-tiny is the Report stage's table.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from pipeline.compressed import DECODE_PATHS, Int8MoEFFN, QLinear, calibrate_dense_above
from pipeline.moefication.router import Router
from pipeline.quant import Int8Linear, quantize_rows
from timing import median_time


def int8(w: torch.Tensor, b: torch.Tensor | None, cls):
    q, s = quantize_rows(w)
    return cls(q, s, b)


def moe_path(path: str):
    """The MoE FFN with its one-token path set to ``path`` (``Int8MoEFFN.decode_path``); "gemv"
    also runs calls of more tokens in C (``Int8MoEFFN.gemv_tokens``)."""
    def run(L, x):
        L["moe8"].decode_path, L["moe8"].gemv_tokens = path, 10**9 if path == "gemv" else 0
        try:
            return L["moe8"](x)
        finally:
            L["moe8"].decode_path, L["moe8"].gemv_tokens = "eager", 0
    return run


def one_block_models(d: int, f: int, e: int, topk: int, tmp: Path) -> dict:
    """fp32, int8 and int8 + MoE versions of a one-block GPT-J of width ``d`` (random weights)."""
    from safetensors.torch import save_file

    from pipeline.compressed import export_compressed, load_compressed
    from pipeline.models import GPTJ, GPTJConfig

    config = GPTJConfig(vocab_size=512, n_positions=2048, n_embd=d, n_layer=1, n_head=d // 256, rotary_dim=64,
                        n_inner=f, activation="relu")
    model = GPTJ(config).eval()
    labels = torch.randperm(f) % e
    save_file({"layer_000.labels": labels}, str(tmp / "clusters.safetensors"))
    save_file({"layer_000.a": torch.randn(e, d), "layer_000.b": torch.eye(e)}, str(tmp / "routers.safetensors"))
    export_compressed(model, tmp / "int8")
    sizes = export_compressed(model, tmp / "moe", tmp, topk, calibrate=True)
    print(f"export: dense from {sizes['dense_above']:.0%} of the experts, one token through the "
          f"{sizes['decode_path']} path, calls of 2 to {sizes['gemv_tokens']} tokens in C")
    return {"fp32": model, "int8": load_compressed(tmp / "int8"), "int8 + MoE": load_compressed(tmp / "moe")}


def decode_table(args, topk: int) -> None:
    from pipeline.decode import use_c_attention
    from pipeline.report import decode_seconds

    with tempfile.TemporaryDirectory() as tmp:
        models = one_block_models(args.d_model, args.d_ff, args.experts, topk, Path(tmp))
        for model in models.values():  # the attention step as served (pipeline.report.serving_speed)
            use_c_attention(model)
        times = {name: [] for name in models}
        for _ in range(3):  # interleaved rounds
            for name, model in models.items():
                context = torch.randint(0, model.config.vocab_size, (1, args.context))
                with torch.no_grad():
                    times[name].append(decode_seconds(model, context, 8))
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nbatch-1 decoding with the KV cache at context {args.context}, one GPT-J-width block:")
    for name, seconds in t.items():
        print(f"  {name:12s} {seconds * 1e3:8.2f} ms/token   {t['fp32'] / seconds:5.2f}x fp32   "
              f"{t['int8'] / seconds:5.2f}x int8")


def model_table(args) -> None:
    from pipeline.compressed import load_compressed
    from pipeline.models import from_pretrained
    from pipeline.report import SPEEDS, serving_speed

    teacher = from_pretrained(args.teacher).eval()
    models = {"teacher": teacher}
    for path in DECODE_PATHS:
        model = load_compressed(args.model)
        for block in model.transformer.h:
            block.mlp.decode_path = path
        models[f"compressed, MoE decode {path}"] = model
    speed = serving_speed(models, teacher.config.vocab_size, rounds=args.runs)
    print(f"{args.model} against {args.teacher}, {torch.get_num_threads()} threads, tokens/s (ratio to the teacher)")
    for name, per in speed.items():
        print(f"  {name:34s} " + "   ".join(f"{k} {per[k]:8.1f} ({per[k] / speed['teacher'][k]:.2f}x)" for k in SPEEDS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-ff", type=int, default=16384)
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--layers", type=int, default=2, help="weight sets cycled through (beats the cache)")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--context", type=int, default=512, help="decoding: the tokens already in the KV cache")
    p.add_argument("--model", type=Path, help="a compressed model directory (with --teacher): its serving speed")
    p.add_argument("--teacher", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        return model_table(args)
    torch.manual_seed(0)
    d, f, e = args.d_model, args.d_ff, args.experts
    topk = max(1, round(args.fraction * e))
    layers = []
    for _ in range(args.layers):
        attn = [torch.randn(d, d) / d**0.5 for _ in range(4)]
        w1, b1 = torch.randn(f, d) / d**0.5, torch.zeros(f)
        w2, b2 = torch.randn(d, f) / f**0.5, torch.zeros(d)
        router = Router(d, e, torch.randn(e, d))
        fc_in8, fc_out8 = int8(w1, b1, Int8Linear), int8(w2, b2, Int8Linear)
        layers.append({
            "attn": attn, "w1": w1, "b1": b1, "w2": w2, "b2": b2,
            "attn8": [int8(w, None, Int8Linear) for w in attn], "fc_in8": fc_in8, "fc_out8": fc_out8,
            "moe8": Int8MoEFFN(int8(w1, b1, QLinear), int8(w2, b2, QLinear), router, topk, fc_in8, fc_out8),
        })
    crossover = calibrate_dense_above(layers[0]["moe8"])  # as the export measures it
    for L in layers:
        L["moe8"].dense_above = crossover
    print(f"d_model {d}, d_ff {f}, {e} experts, top-{topk}; {torch.get_num_threads()} threads; "
          f"median of {args.runs} calls, each on the next of {args.layers} weight sets")
    paths = {
        "fp32 attention projections": lambda L, x: [torch.nn.functional.linear(x, w) for w in L["attn"]],
        "int8 attention projections": lambda L, x: [m(x) for m in L["attn8"]],
        "fp32 FFN": lambda L, x: torch.relu(x @ L["w1"].T + L["b1"]) @ L["w2"].T + L["b2"],
        "int8 FFN (fbgemm)": lambda L, x: L["fc_out8"](torch.relu(L["fc_in8"](x))),
        "int8 MoE FFN": lambda L, x: L["moe8"](x),
        "int8 MoE FFN, gathered": moe_path("gathered"),
        "int8 MoE FFN, bagged": moe_path("bagged"),
        "int8 MoE FFN, C (gemv)": moe_path("gemv"),
    }
    for tokens in (1, 16):
        base = torch.randn(1, d)
        x = base + 0.3 * torch.randn(tokens, d)
        with torch.no_grad():
            chosen = layers[0]["moe8"].router(x).topk(topk, dim=-1).indices
        share = len(torch.unique(chosen)) / e
        path = "dense, masked" if share >= layers[0]["moe8"].dense_above else "sparse"
        times = {}
        for _ in range(3):  # interleaved rounds: noise hits every path alike
            for name, fn in paths.items():
                counter = iter(range(10**9))
                with torch.no_grad():
                    t = median_time(lambda: fn(layers[next(counter) % args.layers], x), args.runs)
                times.setdefault(name, []).append(t)
        t = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{tokens} token(s): the tokens choose {share:.0%} of the experts between them ({path} path)")
        for name, seconds in t.items():
            print(f"  {name:28s} {seconds * 1e3:8.2f} ms")
        print(f"  attention projections: int8 {t['fp32 attention projections'] / t['int8 attention projections']:.2f}x fp32")
        print(f"  FFN: int8 dense {t['fp32 FFN'] / t['int8 FFN (fbgemm)']:.2f}x fp32, "
              f"int8 MoE {t['fp32 FFN'] / t['int8 MoE FFN']:.2f}x fp32")
        block32 = t["fp32 attention projections"] + t["fp32 FFN"]
        moe = min(v for k, v in t.items() if k.startswith("int8 MoE FFN"))  # what export picks
        dense8 = t["int8 attention projections"] + t["int8 FFN (fbgemm)"]
        block8 = t["int8 attention projections"] + moe
        print(f"  int8 MoE FFN (the faster path) {t['int8 FFN (fbgemm)'] / moe:.2f}x the dense int8 FFN; block "
              f"linear layers: int8 + MoE {block32 / block8:.2f}x fp32, {dense8 / block8:.2f}x dense int8")
    decode_table(args, topk)


if __name__ == "__main__":
    main()
