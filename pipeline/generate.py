"""Generate text from a pipeline model on CPU and report its speed:

    python -m pipeline.generate --model artifacts/FinalCompressed/<version> --prompt "def main("

``--model`` is a compressed model directory (int8 weights, routers: run with the int8 kernels and
the sparse MoE path), a FinalCompressed artifact (its ``compressed/`` directory when it has one,
else its dense weights), or any model directory with config.json and safetensors. The tokenizer
is the directory's ``tokenizer.json`` (or ``--tokenizer``). Greedy by default.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline import cli
from pipeline.cli import UsageError
from pipeline.compressed import COMPRESSED_DIR
from pipeline.decode import use_c_attention

TOKENIZER = "tokenizer.json"


def resolve(path: Path) -> Path:
    """The directory to load for ``--model``: a FinalCompressed artifact's compressed model when it has one."""
    if not path.is_dir():
        raise UsageError(f"--model {path} is not a directory (expected a model or FinalCompressed artifact directory)")
    check_artifact(path)
    return path / COMPRESSED_DIR if (path / COMPRESSED_DIR / "config.json").is_file() else path


def check_artifact(path: Path) -> None:
    """When ``path`` is a published artifact, every file must still match its manifest (checked
    through its store, so that files verified since they last changed are not reread)."""
    from pipeline.artifacts import MANIFEST, CorruptArtifact, Store

    if (path / MANIFEST).is_file():
        try:
            store = Store(path.parent.parent)
            store.verify(store.get(path.parent.name, path.name))
        except CorruptArtifact as e:
            raise UsageError(f"--model {path}: {e}") from None


MOE_PATHS = {"auto": None, "sparse": float("inf"), "dense": 0.0}  # load_compressed's dense_above


def load_model(path: Path, moe_path: str = "auto"):
    """A compressed (int8, maybe MoE) model or a dense one, whichever ``path`` holds, for CPU
    inference; a dense model with routers beside it (a FinalCompressed artifact trained with MoE,
    without int8) runs as the MoE it was trained as, on the sparse path."""
    from safetensors import safe_open

    from pipeline.compressed import is_compressed, load_compressed
    from pipeline.models import from_pretrained
    from pipeline.models.config import CheckpointError
    from pipeline.moefication import BMMoE
    from pipeline.moefication.files import ROUTERS

    try:
        if is_compressed(path):
            return load_compressed(path, dense_above=MOE_PATHS[moe_path])
        model = from_pretrained(path)
        if (path / ROUTERS).is_file():
            with safe_open(str(path / ROUTERS), "pt") as f:
                meta = f.metadata() or {}
            BMMoE.moefy(model, int(meta["num_expert"]), int(meta["topk"]), path, sparse=moe_path != "dense")
        return model
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        raise UsageError(f"--model {path}: {e}") from None


@torch.no_grad()
def generate(model, ids: list[int], new_tokens: int, temperature: float = 0.0, seed: int = 0,
             kv_cache: bool = True, stats: dict | None = None) -> list[int]:
    """``ids`` extended by ``new_tokens`` tokens. With ``kv_cache`` the prompt is prefilled once and
    each new token then runs alone against the static KV cache; without, every token recomputes
    the window. Either way the window slides at the model's n_positions (with the cache full, the
    last n_positions tokens are prefilled again: what the recompute does). ``stats`` receives
    the prefill's and the decoding's tokens and seconds."""
    gen = torch.Generator().manual_seed(seed)
    ids, limit = list(ids), model.config.n_positions
    if kv_cache:
        model.setup_caches(1, min(limit, len(ids) + new_tokens))
    cached, times = 0, {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
    for step in range(new_tokens):
        start = time.perf_counter()
        if kv_cache and 0 < cached < limit:  # one token at the next position
            logits = model(torch.tensor([ids[-1:]]), input_pos=torch.tensor([cached]))[0, -1]
            cached += 1
        else:  # the whole window: the first step, every step without the cache, and a full cache's
            window = ids[-limit:]
            logits = model(torch.tensor([window]), **({"input_pos": torch.arange(len(window))} if kv_cache else {}))[0, -1]
            cached = len(window)
        phase = "decode" if step else "prefill"  # the prompt's tokens, then one new token per step
        times[f"{phase}_tokens"] += 1 if step else len(window)
        times[f"{phase}_s"] += time.perf_counter() - start
        logits = logits.float()
        if temperature > 0:
            ids.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)))
        else:
            ids.append(int(logits.argmax()))
    if stats is not None:
        stats.update(times)
    return ids


def check_vocabulary(tokenizer, tokenizer_file: Path, path: Path) -> None:
    """Refuse a tokenizer whose ids the model has no embedding for."""
    import json

    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    if tokenizer.get_vocab_size() > vocab:
        raise UsageError(f"--tokenizer {tokenizer_file} has {tokenizer.get_vocab_size()} tokens, more than the "
                         f"model's vocabulary of {vocab} ({path / 'config.json'} vocab_size); use the tokenizer the "
                         f"model was trained with")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=32)
    p.add_argument("--temperature", type=cli.non_negative_float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, help=f"a tokenizers JSON file (default: the model directory's {TOKENIZER})")
    p.add_argument("--threads", type=cli.non_negative_int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--kv-cache", choices=("on", "off"), default="on",
                   help="decode with a static KV cache (on), or recompute the whole window for every token (off)")
    p.add_argument("--moe-path", choices=tuple(MOE_PATHS), default="auto",
                   help="MoE FFNs: the chosen experts only (sparse), every neuron masked (dense), or by the share "
                        "of experts a call uses, from the crossover measured at export (auto)")
    args = p.parse_args(argv)
    path = resolve(args.model)
    if args.tokenizer is not None and not args.tokenizer.is_file():
        raise UsageError(f"--tokenizer {args.tokenizer} does not exist")
    tokenizer_file = args.tokenizer or next((d / TOKENIZER for d in (path, args.model) if (d / TOKENIZER).is_file()), None)
    if tokenizer_file is None:
        raise UsageError(f"no tokenizer: {path / TOKENIZER} does not exist (pass --tokenizer FILE)")
    from tokenizers import Tokenizer

    from pipeline.compressed import Int8MoEFFN, is_compressed
    from pipeline.moefication.moe import MoEFFN

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    check_vocabulary(tokenizer, tokenizer_file, path)
    model = load_model(path, args.moe_path)
    use_c_attention(model)
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt:
        raise UsageError("--prompt encodes to no tokens; give some text")
    stats: dict = {}
    ids = generate(model, prompt, args.max_new_tokens, args.temperature, args.seed, args.kv_cache == "on", stats)
    print(tokenizer.decode(ids))
    moe = isinstance(model.transformer.h[0].mlp, (Int8MoEFFN, MoEFFN))
    kind = ("int8" if is_compressed(path) else "dense fp32") + (" MoE" if moe else "")
    decode = (f"decode {stats['decode_tokens']} tokens at {stats['decode_tokens'] / stats['decode_s']:.1f} tokens/s"
              if stats["decode_tokens"] else "no decode step")
    print(f"--- prefill {stats['prefill_tokens']} tokens at {stats['prefill_tokens'] / stats['prefill_s']:.1f} tokens/s, "
          f"{decode} (KV cache {args.kv_cache}; {kind} model from {path})")
    return 0


if __name__ == "__main__":
    cli.run(main)
