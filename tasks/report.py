"""Report: every variant evaluated on the same held-out tokens (perplexity, fidelity to the
teacher, file size, CPU tokens per second for 1 and 16 tokens, measured side by side in this run),
as ``report.md`` with plots. Variants: the teacher, the ReLU model, the MoE at the Routers' top-k,
the matched control (the teacher fine-tuned with the same recipe, steps, data and distillation,
nothing compressed), 2:4 + KD, int8 QAT + KD, int8 + 2:4 + KD, MoE + KD (each a FinalCompressed
run with those toggles and the configured training settings), the configured FinalCompressed, and
int8 post-training quantization of the teacher without training (the baseline QAT must beat).
Every row's perplexity is compared with the teacher's and with the control's: the control's ratio
is what compression costs, the teacher's adds what the extra training gained. A FinalCompressed
run measures its deployed model on the same windows when its evaluation settings are the
Report's; those figures are read from its manifest (``recorded_deployed``), not measured again."""
from __future__ import annotations

from pathlib import Path

import luigi

from tasks.base_model import BaseModel
from tasks.corpus import Corpus, check_windows
from tasks.ranks import evaluate
from tasks.final_compressed import FinalCompressed, recorded_deployed
from tasks.relu_model import ReluModel
from tasks.routers import Routers
from tasks.params import Count, HarnessTasks, SeqLen
from tasks.stage import Stage

CONTROL = "control: KD, nothing compressed"
# FinalCompressed toggles (int8, pruning, moe, distill) of the control and the single-method rows
VARIANTS = {
    CONTROL: (False, False, False, True),
    "MoE + KD": (False, False, True, True),
    "2:4 + KD": (False, True, False, True),
    "int8 QAT + KD": (True, False, False, True),
    "int8 + 2:4 + KD": (True, True, False, True),
}


class Report(Stage):
    eval_tokens = Count(at_least="seq_len", description="validation tokens per perplexity")
    seq_len = SeqLen()
    rounds = Count(description="speed: rounds of interleaved measurements (median)")
    harness_tasks = HarnessTasks(description="lm-eval tasks to run on every row, comma-separated (empty: none)")
    harness_include = luigi.Parameter(description="a directory of lm-eval task files (empty: the harness's own)")
    harness_limit = Count(zero="all", description="documents per harness task (0: all)")

    def upstream(self):
        ups = {"Corpus": Corpus(), "BaseModel": BaseModel(), "ReluModel": ReluModel(), "Routers": Routers(),
               "final": FinalCompressed()}
        for name, (int8, pruning, moe, distill) in VARIANTS.items():
            ups[name] = FinalCompressed(int8=int8, pruning=pruning, moe=moe, distill=distill)
        return ups

    def methods(self) -> tuple[str, ...]:
        return ("compressed", "moe", "quant")  # the int8 baseline and the int8 MoE rows

    def effective_params(self) -> dict:
        params = {"eval_tokens": self.eval_tokens, "seq_len": self.seq_len, "rounds": self.rounds}
        if self.harness_names():
            from pipeline.artifacts import sha256_file

            files = sorted(p for p in Path(self.harness_include).rglob("*") if p.is_file()) if self.harness_include else []
            params.update(harness_tasks=self.harness_names(), harness_limit=self.harness_limit,
                          harness_files={str(p.relative_to(self.harness_include)): sha256_file(p) for p in files})
        return params

    def result_path(self):
        return super().result_path() / "report.md"

    def harness_names(self) -> list[str]:
        return [n.strip() for n in self.harness_tasks.split(",") if n.strip()]

    def check_inputs(self, inputs) -> None:
        if "Corpus" in inputs:
            check_windows(inputs["Corpus"], self.seq_len, ("valid",))

    def needs(self):
        from pipeline.resources import Needs, int8_export_bytes

        model = self.model_bytes()
        # every row beside the teacher's own forward on the same windows (its fidelity)
        flops, rank = self.evaluation_needs(len(VARIANTS) + 5, self.eval_tokens, reference=True)
        return Needs(int8_export_bytes(model) + 5 * 2**20, 2.5 * model,
                     "an int8 copy of the teacher and five plots; the teacher and one variant held at a time",
                     flops, 2 * rank)

    def build(self, build, inputs) -> None:
        import torch

        from pipeline.compressed import COMPRESSED_DIR, export_compressed, load_compressed
        from pipeline.evaluate import job
        from pipeline.models import from_pretrained
        from pipeline.moefication.files import CLUSTERS, ROUTERS
        from pipeline.moefication.moe import load_moefied
        from pipeline.report import compare, measure_rows, write_markdown

        base, relu, routers = inputs["BaseModel"], inputs["ReluModel"], inputs["Routers"]
        num_expert, topk = routers.metrics["num_expert"], routers.metrics["topk"]

        def dense_bytes(artifact, moe=False):
            files = ["model.safetensors"] + ([CLUSTERS, ROUTERS] if moe else [])
            return sum(artifact.file(f).stat().st_size for f in files)

        def moe_model(name, path, routers_dir):
            return job(name, load_moefied, path=str(path), num_expert=num_expert, topk=topk, routers=str(routers_dir),
                       sparse=True)

        def final_row(name, artifact):
            toggles = artifact.metrics["toggles"]
            if toggles["int8"]:
                moe = ""
                if toggles["moe"]:
                    share, gemv = artifact.metrics["moe_dense_above"], artifact.metrics.get("moe_gemv_tokens", 0)
                    moe = (f"; MoE FFNs: one token on the {artifact.metrics['moe_decode_path']} path"
                           + (f", calls of 2 to {gemv} tokens on the C path" if gemv else "")
                           + f", longer calls on the sparse path below {share:.0%} of the experts per call and masked "
                           f"dense from there (as measured at export{', so always dense' if share * num_expert <= topk else ''})")
                return (name, job(name, load_compressed, cpu=True, path=str(artifact.path / COMPRESSED_DIR)),
                        artifact.metrics["compressed_bytes"],
                        f"FinalCompressed {artifact.version}: {artifact.metrics['variant']}, int8 model as deployed "
                        f"(`compressed/`, fbgemm int8 GEMMs{moe})")
            if toggles["moe"]:
                return (name, moe_model(name, artifact.path, artifact.path), dense_bytes(artifact, True),
                        f"FinalCompressed {artifact.version}: {artifact.metrics['variant']}, sparse MoE path")
            return (name, job(name, from_pretrained, path=str(artifact.path)), dense_bytes(artifact),
                    f"FinalCompressed {artifact.version}: {artifact.metrics['variant']}, dense fp32 weights with the "
                    f"2:4 zeros stored (no sparse format)")

        finals = {**{name: name for name in VARIANTS}, f"final: {inputs['final'].metrics['variant']}": "final"}
        ptq_dir = build.path / "int8_ptq"
        # deployed as the QAT runs' exports are: each weight shape's C int8 linear crossover measured here
        ptq = export_compressed(from_pretrained(base.path).eval(), ptq_dir, calibrate=True)
        moe_name, ptq_name = f"MoE {round(100 * topk / num_expert)}% experts", "int8 PTQ (no training)"
        rows = [
            ("teacher", job("teacher", from_pretrained, path=str(base.path)), dense_bytes(base),
             f"BaseModel {base.version}, fp32"),
            ("ReLU", job("ReLU", from_pretrained, path=str(relu.path)), dense_bytes(relu), f"ReluModel {relu.version}, fp32"),
            (moe_name, moe_model(moe_name, relu.path, routers.path),
             dense_bytes(relu) + sum(routers.file(f).stat().st_size for f in (CLUSTERS, ROUTERS)),
             f"the ReLU model with Routers {routers.version}, top-{topk} of {num_expert}, sparse MoE path, fp32"),
            *[final_row(name, inputs[key]) for name, key in finals.items()],
            (ptq_name, job(ptq_name, load_compressed, cpu=True, path=str(ptq_dir)), ptq["bytes"],
             "the teacher's weights rounded to int8 per row, no training: the baseline QAT must beat"),
        ]
        # the FinalCompressed runs' own evaluations of their deployed models, where they used these windows
        recorded = {name: recorded_deployed(inputs[key], self.seq_len, self.eval_tokens) for name, key in finals.items()}
        recorded = {name: figures for name, figures in recorded.items() if figures is not None}
        with build.timed("evaluate"):  # on the [pipeline] ranks: the teacher and one variant at a time
            evaluations = evaluate(build, [spec for name, spec, _, _ in rows if name not in recorded],
                                   inputs["Corpus"].file("valid.npy"), self.seq_len, self.eval_tokens,
                                   reference=rows[0][1])
        evaluations.update(recorded)
        teacher_model = from_pretrained(base.path).eval()
        with build.timed("speed"):  # here, the teacher and one variant at a time
            results = compare(measure_rows(teacher_model, rows, evaluations, teacher_model.config.vocab_size,
                                           self.rounds), CONTROL)
        n_layer = teacher_model.config.n_layer
        del teacher_model
        if self.harness_names():
            with build.timed("harness"):
                self.harness(rows, inputs["Corpus"].file("tokenizer.json"), results)
        metrics = {"rows": results, "eval_tokens": self.eval_tokens, "seq_len": self.seq_len, "rounds": self.rounds,
                   "threads": torch.get_num_threads(), "control": CONTROL}
        build.metrics.update(metrics)
        self.plots(build.path, inputs, results)
        write_markdown(metrics, build.path, f"Compression report: {n_layer}-layer GPT-J")

    def harness(self, rows, tokenizer, results) -> None:
        """Each row's scores on the ``harness_tasks``, into its result (one model held at a time)."""
        from functools import partial

        from pipeline.evaluate import load_job_model
        from pipeline.harness import evaluate_rows

        found = evaluate_rows([(name, partial(load_job_model, spec)) for name, spec, _, _ in rows], tokenizer,
                              self.harness_names(), Path(self.harness_include) if self.harness_include else None,
                              self.harness_limit or None)
        for r in results:
            r["harness"] = found[r["name"]]

    def plots(self, out, inputs, rows) -> None:
        from pipeline.report import plot_fidelity, plot_layers, plot_loss_curves, plot_perplexity_size

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
        plot_fidelity(rows, out / "fidelity.png")
