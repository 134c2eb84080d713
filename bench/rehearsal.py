"""A rehearsal of ``make compress`` at GPT-J's width on this machine: a two-layer model with GPT-J's
d_model, d_ff, heads, rotary dimension and vocabulary, random weights, imported from a Hugging
Face directory this script writes, with budgets small enough for 2 cores and 24 GB.

Every stage of the graph runs on its own (``luigi --module tasks <Stage>``, upstream first) and is
measured: wall time, the peak resident memory of all its processes (sampled), the disk it wrote
(sampled, and what its version and its progress held when it was published), beside the estimates
it recorded in its manifest (the figures ``tasks.plan`` prints).

    python bench/rehearsal.py [--work DIR] [--nproc 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = """
[pipeline]
model = gpt-j
checkpoint = {checkpoint}
nproc_per_node = {nproc}

[Corpus]
max_bytes = 200000

[BaseModel]
eval_tokens = 1024
seq_len = 128

[ReluModel]
steps = 2
batch_size = 2
seq_len = 128
warmup = 1
eval_tokens = 1024
save_interval = 1

[HiddenStates]
token_budget = 4096
seq_len = 128
batch_size = 2
part_tokens = 2048

[ExpertClusters]
num_expert = 512
sample_tokens = 2048
iterations = 5

[Routers]
epochs = 1
batch_size = 256

[Moefied]
eval_tokens = 512
seq_len = 128

[FinalCompressed]
steps = 2
batch_size = 2
seq_len = 128
warmup = 1
eval_tokens = 512
save_interval = 1

[Report]
eval_tokens = 512
seq_len = 128
rounds = 1
"""


def gptj_width_checkpoint(path: Path) -> None:
    """GPT-J's width, heads, rotary dimension and vocabulary, two layers, random weights."""
    import torch

    from pipeline import data
    from pipeline.models import GPTJ, get_preset, save_pretrained

    torch.manual_seed(0)
    save_pretrained(GPTJ(get_preset("gpt-j").replace(n_layer=2)), path)
    root, files = data.stdlib_files()
    data.train_tokenizer(files[:200], 8192, 2_000_000).save(str(path / "tokenizer.json"))


def tree_rss(pid: int) -> int:
    """The resident bytes of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_stage(cmd: list[str], env: dict, stage_dir: Path, log: Path) -> dict:
    """Run one stage; its wall time, the peak resident memory of its process tree and the peak
    growth of its stage directory (scratch and resume state included), sampled."""
    before, start, peak, disk, last = du(stage_dir), time.time(), 0, 0, 0.0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            if time.time() - last > 1.0:
                disk, last = max(disk, du(stage_dir) - before), time.time()
            time.sleep(0.2)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{log.read_text()[-4000:]}")
    return {"wall_s": time.time() - start, "peak_rss": peak, "disk": max(disk, du(stage_dir) - before)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="where the checkpoint and the store go (default: a temporary directory)")
    p.add_argument("--nproc", type=int, default=1)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rehearsal-"))
    checkpoint, store, cfg = work / "gpt-j-2-layers", work / "store", work / "rehearsal.cfg"
    if not (checkpoint / "model.safetensors").is_file():
        print(f"writing a GPT-J-width checkpoint to {checkpoint} ...", flush=True)
        gptj_width_checkpoint(checkpoint)
    cfg.write_text(CONFIG.format(checkpoint=checkpoint, nproc=args.nproc))
    env = {**os.environ, "PIPELINE_ARTIFACTS": str(store), "LUIGI_CONFIG_PATH": str(cfg), "PYTHONUNBUFFERED": "1"}

    os.environ.update(LUIGI_CONFIG_PATH=str(cfg), PIPELINE_ARTIFACTS=str(store))  # before Luigi reads its config
    from luigi.cmdline_parser import CmdlineParser

    import tasks
    from tasks.stage import graph

    with CmdlineParser.global_instance(["Report"]):
        stages = [(t.stage_name, t.to_str_params(only_significant=True)) for t in graph([tasks.Report()])]
    GB = 1024**3
    print(f"{'stage':<52} {'wall':>7} {'peak RSS':>9} {'planned':>9} {'ratio':>6} {'disk':>9} {'planned':>9} {'ratio':>6}")
    for i, (name, params) in enumerate(stages):
        flags = [x for k, v in params.items() for x in (f"--{k.replace('_', '-')}", v)]
        measured = run_stage([sys.executable, "-m", "luigi", "--module", "tasks", name, *flags], env, store / name,
                             work / f"{i:02d}-{name}.log")
        newest = max((json.loads(m.read_text()) for m in (store / name).glob("*/manifest.json")),
                     key=lambda m: m["created"])  # the version this run just published
        metrics = newest["metrics"]
        memory, disk = metrics["estimated_memory_bytes"], metrics["estimated_disk_bytes"]
        # the sampling can miss the moment the progress sits beside the payload, just before publishing
        at_publish = sum(f["bytes"] for f in newest["files"].values()) + newest["resume_bytes_at_publish"]
        measured["disk"] = max(measured["disk"], at_publish)
        label = name + "".join(f" {k}={v}" for k, v in params.items() if k in ("int8", "pruning", "moe", "method",
                                                                             "cluster_method", "moefication") and v)
        print(f"{label[:52]:<52} {measured['wall_s']:>6.0f}s {measured['peak_rss'] / GB:>8.2f}G {memory / GB:>8.2f}G "
              f"{memory / max(measured['peak_rss'], 1):>5.2f}x {measured['disk'] / GB:>8.2f}G {disk / GB:>8.2f}G "
              f"{disk / max(measured['disk'], 1):>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
