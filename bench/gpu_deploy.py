"""GPT-J-6B-shaped serving on a GPU: int8, int8 + MoE and int8 + 2:4 against the bf16 model, all
compiled the same way (``pipeline.serving.Decoder``: every block compiled, a decoded token one
CUDA graph replay), side by side in one run.

The model is built on the device with random weights (28 layers, d_model 4096, d_ff 16384: 12 GB
in bf16). Variants:

* bf16: the dense model as it is (``F.linear``), the baseline;
* int8: every linear layer int8 per row (``ServingLinear``), each shape's path per call size
  (weight-only, W8A8, bf16) measured here by ``choose_paths``;
* int8 + MoE: the FFNs as 512 experts of contiguous neurons, 20% chosen by a router per token
  (``ServingMoEFFN``: one token through the chosen experts only);
* int8 + 2:4: the blocks' weights pruned 2:4 by magnitude, so cuSPARSELt is a candidate too.

For each: batch-1 decode tokens/s after a ``--context``-token prompt, and 16- and 256-token
prefill time, each as a ratio to bf16; the paths chosen per shape are printed as the export
records them in config.json. ``--layers 2`` (or ``--device cpu --small``) checks the script
itself in seconds.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn as nn

from kernels.sparsity import m4n2_1d
from pipeline.models import GPTJ, GPTJConfig
from pipeline.moefication.router import Router
from pipeline.quant import quantize_rows
from pipeline.serving import Decoder, ServingLinear, ServingMoEFFN, choose_paths, seconds_per_call

PREFILLS = (16, 256)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def bf16_model(config: GPTJConfig, device) -> GPTJ:
    with torch.device("meta"):
        model = GPTJ(config)
    model.to_empty(device=device).init_weights_(seed=0)
    return model.reset_rope_().to(torch.bfloat16).eval()


def int8_linear(linear: nn.Linear, sparse: bool) -> ServingLinear:
    w = linear.weight.float()
    q, s = quantize_rows(w * m4n2_1d(w) if sparse else w)
    return ServingLinear(q, s, linear.bias, dtype=linear.weight.dtype)


@torch.no_grad()
def int8_model(dense: GPTJ, sparse: bool = False, experts: int = 0, share: float = 0.2) -> GPTJ:
    """``dense`` with int8 linear layers (2:4 in the blocks with ``sparse``; a router and
    ``experts`` experts per FFN, ``share`` of them chosen per token, with ``experts``)."""
    model = copy.deepcopy(dense)
    for block in model.transformer.h:
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(block.attn, name, int8_linear(getattr(block.attn, name), sparse))
        fc_in, fc_out = int8_linear(block.mlp.fc_in, sparse), int8_linear(block.mlp.fc_out, sparse)
        if experts:
            d = fc_in.q_weight.shape[1]
            router = Router(d, experts, torch.randn(experts, d, device=fc_in.q_weight.device)).to(fc_in.q_weight.device)
            block.mlp = ServingMoEFFN(fc_in, fc_out, router, max(1, round(share * experts)), experts)
        else:
            block.mlp.fc_in, block.mlp.fc_out = fc_in, fc_out
    model.lm_head = int8_linear(model.lm_head, False)
    return model


def measure(model: GPTJ, context: int, steps: int) -> dict:
    """Decode tokens/s after a ``context``-token prompt and each prefill's seconds."""
    decoder = Decoder(model, max_len=max(context + steps, max(PREFILLS)))
    vocab = model.config.vocab_size
    device = decoder.device
    out = {}
    for tokens in PREFILLS:
        ids = torch.randint(0, vocab, (1, tokens), device=device)
        out[f"prefill_{tokens}_ms"] = seconds_per_call(lambda: decoder.step(ids, torch.arange(tokens, device=device))) * 1e3
    prompt = torch.randint(0, vocab, (1, context), device=device)
    decoder.generate(prompt, 4)  # warm: every shape compiled, the decode graph captured
    token = decoder.step(prompt, torch.arange(context, device=device))[:, -1:].argmax(-1)
    positions = [torch.tensor([context + i], device=device) for i in range(steps)]
    sync()
    start = time.perf_counter()
    for pos in positions:
        token = decoder.decode(token, pos)[:, -1:].argmax(-1)
    sync()
    out["decode_tokens_per_s"] = steps / (time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--small", action="store_true", help="a d_model 256 model: check the script on CPU")
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--share", type=float, default=0.2)
    p.add_argument("--context", type=int, default=PREFILLS[-1], help="prompt tokens before decoding (a prefill"
                   " size: no extra compilation)")
    p.add_argument("--steps", type=int, default=64, help="decoded tokens timed")
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()
    d, f = (256, 1024) if args.small else (4096, 16384)
    config = GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=d, n_layer=args.layers, n_head=d // 256,
                        rotary_dim=64, n_inner=f, activation="relu")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: GPT-J shape, {args.layers} layers, d_model {d}, d_ff {f}; {args.experts} experts at {args.share:.0%}")
    torch.manual_seed(0)
    dense = bf16_model(config, device)  # kept uncompiled: each variant starts from a copy
    results, paths, known = {"bf16": measure(copy.deepcopy(dense), args.context, args.steps)}, {}, None
    builders = {"int8": lambda: int8_model(dense), "int8 + MoE": lambda: int8_model(dense, experts=args.experts,
                                                                                   share=args.share),
                "int8 + 2:4": lambda: int8_model(dense, sparse=True)}
    for label, build in builders.items():
        start = time.perf_counter()
        model = build()
        paths[label] = known = choose_paths(model, known=known)  # a shape measured once serves every variant
        results[label] = measure(model, args.context, args.steps)
        print(f"{label}: built, paths chosen and measured in {time.perf_counter() - start:.0f} s")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results["bf16"]
    print(f"\n{'model':12s} {'decode tok/s':>13s} {'ratio':>6s} " + " ".join(f"{f'prefill {t} ms':>15s} {'ratio':>6s}"
                                                                        for t in PREFILLS))
    for label, r in results.items():
        print(f"{label:12s} {r['decode_tokens_per_s']:13.1f} {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:5.2f}x "
              + " ".join(f"{r[f'prefill_{t}_ms']:15.2f} {base[f'prefill_{t}_ms'] / r[f'prefill_{t}_ms']:5.2f}x"
                         for t in PREFILLS))
    print("\npaths chosen per shape (call rows -> kernel), as config.json records them:")
    for label, table in paths.items():
        print(f"  {label}: {json.dumps(table['paths'])}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "results": results, "paths": paths}, fh, indent=2)


if __name__ == "__main__":
    main()
