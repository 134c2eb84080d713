"""Report: every variant evaluated on the same held-out tokens (perplexity, file size, CPU
tokens per second for 1 and 16 tokens, measured side by side in this run), as ``report.md`` with
plots. Variants: the teacher, the ReLU model, the MoE at the Routers' top-k, 2:4 + KD, int8 QAT +
KD, int8 + 2:4 + KD (each a FinalCompressed run with those toggles and the configured training
settings), the configured FinalCompressed, and int8 post-training quantization of the teacher
without training (the baseline QAT must beat)."""
from __future__ import annotations


from tasks.base_model import BaseModel
from tasks.corpus import Corpus, check_windows
from tasks.final_compressed import FinalCompressed
from tasks.relu_model import ReluModel
from tasks.routers import Routers
from tasks.params import Count, SeqLen
from tasks.stage import Stage

# FinalCompressed toggles (int8, pruning, moe, distill) of the single-method rows
VARIANTS = {
    "2:4 + KD": (False, True, False, True),
    "int8 QAT + KD": (True, False, False, True),
    "int8 + 2:4 + KD": (True, True, False, True),
}


class Report(Stage):
    eval_tokens = Count(at_least="seq_len", description="validation tokens per perplexity")
    seq_len = SeqLen()
    rounds = Count(description="speed: rounds of interleaved measurements (median)")

    def upstream(self):
        ups = {"Corpus": Corpus(), "BaseModel": BaseModel(), "ReluModel": ReluModel(), "Routers": Routers(),
               "final": FinalCompressed()}
        for name, (int8, pruning, moe, distill) in VARIANTS.items():
            ups[name] = FinalCompressed(int8=int8, pruning=pruning, moe=moe, distill=distill)
        return ups

    def methods(self) -> tuple[str, ...]:
        return ("compressed", "moe", "quant")  # the int8 baseline and the int8 MoE rows

    def effective_params(self) -> dict:
        return {"eval_tokens": self.eval_tokens, "seq_len": self.seq_len, "rounds": self.rounds}

    def check_inputs(self, inputs) -> None:
        if "Corpus" in inputs:
            check_windows(inputs["Corpus"], self.seq_len, ("valid",))

    def needs(self, inputs):
        from pipeline.resources import Needs, model_bytes

        model = model_bytes(inputs["BaseModel"])
        return Needs(model / 2 + 4 * 2**20, (len(inputs) + 2) * model,
                     f"an int8 copy of the teacher and four plots; {len(inputs) + 2} models held at once for "
                     f"the speed runs")

    def build(self, build, inputs) -> None:
        import torch

        from pipeline.compressed import COMPRESSED_DIR, export_compressed, load_compressed
        from pipeline.data import load_tokens
        from pipeline.evaluate import perplexity
        from pipeline.models import from_pretrained
        from pipeline.moefication import BMMoE
        from pipeline.moefication.files import CLUSTERS, ROUTERS
        from pipeline.report import SPEED_TOKENS, tokens_per_second, write_markdown

        base, relu, routers = inputs["BaseModel"], inputs["ReluModel"], inputs["Routers"]
        num_expert, topk = routers.metrics["num_expert"], routers.metrics["topk"]

        def dense_bytes(artifact, moe=False):
            files = ["model.safetensors"] + ([CLUSTERS, ROUTERS] if moe else [])
            return sum(artifact.file(f).stat().st_size for f in files)

        def moe_model(path, routers_dir):
            model = from_pretrained(path)
            BMMoE.moefy(model, num_expert, topk, routers_dir, sparse=True)
            return model.eval()

        def final_row(name, artifact):
            toggles = artifact.metrics["toggles"]
            if toggles["int8"]:
                moe = ""
                if toggles["moe"]:
                    share = artifact.metrics["moe_dense_above"]
                    moe = (f"; MoE FFNs on the sparse path below {share:.0%} of the experts per call and masked dense "
                           f"from there (the crossover measured at export{', so always dense here' if share * num_expert <= topk else ''})")
                return (name, lambda: load_compressed(artifact.path / COMPRESSED_DIR), artifact.metrics["compressed_bytes"],
                        f"FinalCompressed {artifact.version}: {artifact.metrics['variant']}, int8 model as deployed "
                        f"(`compressed/`, fbgemm int8 GEMMs{moe})")
            if toggles["moe"]:
                return (name, lambda: moe_model(artifact.path, artifact.path), dense_bytes(artifact, True),
                        f"FinalCompressed {artifact.version}: {artifact.metrics['variant']}, sparse MoE path")
            return (name, lambda: from_pretrained(artifact.path), dense_bytes(artifact),
                    f"FinalCompressed {artifact.version}: {artifact.metrics['variant']}, dense fp32 weights with the "
                    f"2:4 zeros stored (no sparse format)")

        ptq_dir = build.path / "int8_ptq"
        teacher_model = from_pretrained(base.path)
        ptq = export_compressed(teacher_model, ptq_dir)
        rows = [
            ("teacher", lambda: teacher_model, dense_bytes(base), f"BaseModel {base.version}, fp32"),
            ("ReLU", lambda: from_pretrained(relu.path), dense_bytes(relu), f"ReluModel {relu.version}, fp32"),
            (f"MoE {round(100 * topk / num_expert)}% experts", lambda: moe_model(relu.path, routers.path),
             dense_bytes(relu) + sum(routers.file(f).stat().st_size for f in (CLUSTERS, ROUTERS)),
             f"the ReLU model with Routers {routers.version}, top-{topk} of {num_expert}, sparse MoE path, fp32"),
            *[final_row(name, inputs[name]) for name in VARIANTS],
            final_row(f"final: {inputs['final'].metrics['variant']}", inputs["final"]),
            ("int8 PTQ (no training)", lambda: load_compressed(ptq_dir), ptq["bytes"],
             "the teacher's weights rounded to int8 per row, no training: the baseline QAT must beat"),
        ]
        valid = load_tokens(inputs["Corpus"].file("valid.npy"))
        models, results = {}, []
        with build.timed("evaluate"):
            for name, load, nbytes, what in rows:
                model = models[name] = load()
                ppl = perplexity(model, valid, self.seq_len, max_tokens=self.eval_tokens, desc=name)["perplexity"]
                results.append({"name": name, "perplexity": round(ppl, 4), "bytes": nbytes, "what": what})
        with build.timed("speed"):
            speed = tokens_per_second(models, models["teacher"].config.vocab_size, rounds=self.rounds)
        teacher = results[0]
        for r in results:
            r.update(perplexity_ratio=round(r["perplexity"] / teacher["perplexity"], 4),
                     size_ratio=round(r["bytes"] / teacher["bytes"], 4))
            for n in SPEED_TOKENS:
                r[f"tokens_per_s_{n}"] = round(speed[r["name"]][n], 1)
                r[f"speed_ratio_{n}"] = round(speed[r["name"]][n] / speed["teacher"][n], 3)
        metrics = {"rows": results, "eval_tokens": self.eval_tokens, "seq_len": self.seq_len, "rounds": self.rounds,
                   "threads": torch.get_num_threads()}
        build.metrics.update(metrics)
        self.plots(build.path, inputs, results)
        write_markdown(metrics, build.path, f"Compression report: {models['teacher'].config.n_layer}-layer GPT-J")

    def plots(self, out, inputs, rows) -> None:
        from pipeline.report import plot_layers, plot_loss_curves, plot_perplexity_size

        curves = {"BaseModel": inputs["BaseModel"].metrics.get("loss_curve"),
                  "ReluModel": inputs["ReluModel"].metrics.get("loss_curve")}
        for name in [*VARIANTS, "final"]:
            curves[f"FinalCompressed: {inputs[name].metrics['variant']}"] = inputs[name].metrics.get("loss_curve")
        plot_loss_curves(curves, out / "loss_curves.png")
        relu = inputs["ReluModel"].metrics
        plot_layers({"ReLU model: zero activations": relu["ffn_sparsity"],
                     "teacher: fc_in outputs <= 0": relu["teacher_ffn_nonpositive"]},
                    "share of FFN activations", "Per-layer activation sparsity", out / "ffn_sparsity.png")
        per_layer = inputs["Routers"].metrics["per_layer"]
        plot_layers({"MLP router": [p["router_coverage"] for p in per_layer],
                     "groundtruth top-k": [p["groundtruth_coverage"] for p in per_layer]},
                    "share of activation mass covered", "Router coverage per layer (held-out tokens)",
                    out / "router_coverage.png")
        plot_perplexity_size(rows, out / "perplexity_size.png")
