"""int8 against fp32 at GPT-J linear sizes, measured side by side in one run.

* inference: the exported int8 linear layer (pipeline.quant.Int8Linear) vs an fp32 F.linear, and
  on CPU (beyond its C calls) vs fbgemm quantizing the call's tokens with one 7-bit scale, the path
  it takes where fbgemm does not sum exactly (``kernels.fbgemm``);
* QAT: one training step of a linear layer on the int8 path (fake-quant forward, quantized
  backward, kernels.linear(int8=True)) vs the same step in plain fp32.
"""
from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

from kernels import fbgemm, int8_backend, linear
from pipeline.quant import Int8Linear, quantize_rows
from timing import median_time

SHAPES = [(4096, 4096), (4096, 16384)]  # (in, out)
TINY = [(256, 1024), (1024, 256)]  # gpt-j-tiny's FFN


def per_call_7bit(q: torch.Tensor, s: torch.Tensor, b: torch.Tensor):
    packed = fbgemm.pack(q, s)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True) + b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    print(f"device {dev}, threads {torch.get_num_threads()}, int8 backend {int8_backend(dev.type)}; "
          f"median of {args.runs} runs")
    cpu = dev.type == "cpu"
    if cpu:
        print(f"fbgemm sums exactly here (tokens quantized one by one): {fbgemm.exact()}")
    print(f"{'shape (in x out)':<18}{'tokens':>7}{'fp32 ms':>10}{'int8 ms':>10}{'speed-up':>10}"
          + (f"{'7-bit ms':>10}{'int8/7-bit':>11}" if cpu else "") + "   inference")
    for k, n in (TINY if cpu else []) + SHAPES:
        w = torch.randn(n, k, device=dev) / k**0.5
        b = torch.randn(n, device=dev)
        q, s = quantize_rows(w)
        int8 = Int8Linear(q, s, b).to(dev)
        seven = per_call_7bit(q, s, b) if cpu else None
        for t in (1, 16, 256, 2048):
            x = torch.randn(t, k, device=dev)
            with torch.no_grad():
                fp = median_time(lambda: (F.linear(x, w, b), sync()), args.runs)
                i8 = median_time(lambda: (int8(x), sync()), args.runs)
                old = median_time(lambda: seven(x), args.runs) if cpu else None
            print(f"{f'{k} x {n}':<18}{t:>7}{fp * 1e3:>10.2f}{i8 * 1e3:>10.2f}{fp / i8:>9.2f}x"
                  + (f"{old * 1e3:>10.2f}{i8 / old:>10.2f}x" if cpu else ""))
    print(f"{'shape (in x out)':<18}{'tokens':>7}{'fp32 ms':>10}{'QAT ms':>10}{'QAT/fp32':>10}   training step")
    for k, n in SHAPES:
        w = (torch.randn(n, k, device=dev) / k**0.5).requires_grad_()
        b = torch.zeros(n, device=dev, requires_grad=True)
        for t in (16, 256):
            x = torch.randn(t, k, device=dev, requires_grad=True)
            g = torch.randn(t, n, device=dev)

            def step(int8):
                linear(x, w, b, int8=int8).backward(g)
                w.grad = b.grad = x.grad = None
                sync()

            fp = median_time(lambda: step(False), args.runs)
            qat = median_time(lambda: step(True), args.runs)
            print(f"{f'{k} x {n}':<18}{t:>7}{fp * 1e3:>10.2f}{qat * 1e3:>10.2f}{qat / fp:>9.2f}x")


if __name__ == "__main__":
    main()
