"""HiddenStates: the ReLU model's FFN inputs (every layer's ``fc_in`` input) over a token budget,
in one HDF5 file joined from per-rank shards (torchrun)."""
from __future__ import annotations


from tasks.corpus import Corpus, split_tokens
from tasks.relu_model import ReluModel
from tasks.params import Count, Number, SeqLen
from tasks.stage import Stage, pipeline_settings, run_logged


class HiddenStates(Stage):
    ENTRY = "pipeline.moefication.hidden"
    token_budget = Count(at_least="seq_len", description="tokens to run through the model")
    heldout_fraction = Number(above=0, below=1, description="share of the budget taken from the valid split")
    seq_len = SeqLen()
    batch_size = Count(description="windows per forward")
    part_tokens = Count(at_least="seq_len", description="tokens per shard file: a crash recomputes at most one "
                                                                "shard per rank")

    def upstream(self):
        return {"Corpus": Corpus(), "ReluModel": ReluModel()}

    def effective_params(self) -> dict:
        settings = pipeline_settings()
        return {"token_budget": self.token_budget, "heldout_fraction": self.heldout_fraction,
                "seq_len": self.seq_len, "part_tokens": self.part_tokens,
                "world_size": settings.world_size()}

    @classmethod
    def progress(cls, resume, params: dict) -> str:
        shards = len(list(resume.parent.glob("shard-*.h5")))  # complete shards; a partial one is .partial
        return f"partial: resumable with {shards} shard(s) of {params['part_tokens']} tokens written"

    def check_inputs(self, inputs) -> None:
        from pipeline.data import budget_split

        heldout = round(self.token_budget * self.heldout_fraction)
        if heldout < self.seq_len:
            raise ValueError(f"HiddenStates heldout_fraction is {self.heldout_fraction}: it holds out {heldout} of the "
                             f"{self.token_budget}-token budget, fewer than one window of seq_len {self.seq_len} (the "
                             f"routers are measured on held-out tokens); expected at least "
                             f"{self.seq_len / self.token_budget:.4g}")
        if "Corpus" in inputs:  # the corpus holds the budget?
            budget_split(self.token_budget, self.heldout_fraction, split_tokens(inputs["Corpus"]))
        else:  # before the Corpus is built: what its files can hold at most
            budget_split(self.token_budget, self.heldout_fraction, Corpus().token_bounds(), at_most=True)

    def needs(self):
        from pipeline.resources import Needs

        config = pipeline_settings().architecture()
        shards = pipeline_settings().nproc_per_node * pipeline_settings().nnodes
        shards += self.token_budget // self.part_tokens
        # fp16 values and a heldout flag per token, and HDF5's own records (about 16 KiB a shard)
        disk = self.token_budget * (config.n_layer * config.n_embd * 2 + 1) + shards * 16384 * (1 + config.n_layer)
        rank = self.model_bytes() + 64 * self.batch_size * self.seq_len * config.n_embd * 4 * 2
        flops, _ = self.evaluation_needs(1, self.token_budget)
        return Needs(disk, pipeline_settings().nproc_per_node * rank,
                     f"{self.token_budget} tokens x {config.n_layer} layers x {config.n_embd} fp16 values; the model "
                     f"and a batch per rank", flops, rank)

    def build(self, build, inputs) -> None:
        import h5py

        from pipeline import launch
        from pipeline.moefication.files import HIDDEN
        settings = pipeline_settings()
        # finished shards survive a crash: the scratch directory is kept while this marker exists
        build.resume_dir.mkdir(exist_ok=True)
        (build.resume_dir / "shards-in-progress").touch()
        args = ["--model", str(inputs["ReluModel"].path), "--data", str(inputs["Corpus"].path),
                "--out", str(build.path), "--token-budget", str(self.token_budget),
                "--heldout-fraction", str(self.heldout_fraction), "--seq-len", str(self.seq_len),
                "--batch-size", str(self.batch_size), "--part-tokens", str(self.part_tokens)]
        cmd = launch.torchrun_command(args, settings.nproc_per_node, settings.nnodes, settings.rdzv_endpoint,
                                      module=self.ENTRY, log_dir=build.rank_logs)
        with build.timed("dump"):
            run_logged(cmd, build.path / "dump.log")
        with h5py.File(build.path / HIDDEN, "r") as f:
            tokens, heldout = int(f.attrs["tokens"]), int(f["heldout"][:].sum())
            layers, d_model = int(f.attrs["layers"]), int(f.attrs["d_model"])
        build.metrics.update({
            "tokens": tokens, "heldout_tokens": heldout, "layers": layers, "d_model": d_model,
            "bytes": sum(p.stat().st_size for p in build.path.glob("*.h5")),
            "tokens_per_s": round(tokens / max(build.timings["dump"], 1e-9), 1),
        })
