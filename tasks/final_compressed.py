"""FinalCompressed: the student fine-tuned with any combination of int8 quantization-aware training
(BMQuant), the 2:4 masks held (BMPrune), MoE routing active (BMMoE) and distillation from the base
model (BMDistill): the seed's "Combination", with MoEfication added.

The student is the ReLU model when ``moe`` is on, else the base model. The artifact directory is
a Hugging Face GPT-J directory (config.json, model.safetensors with the masks applied,
tokenizer.json); with ``moe`` it also holds the clusters and routers (what ``BMMoE.moefy``
loads); with ``int8`` its ``compressed/`` directory holds the deployable model (int8 weights,
routers, expert permutations) that ``python -m pipeline.generate`` runs.
"""
from __future__ import annotations

import shutil


from tasks.base_model import BaseModel, recorded_perplexity
from tasks.corpus import Corpus
from tasks.ranks import evaluate
from tasks.pruning_masks import PruningMasks
from tasks.relu_model import ReluModel
from tasks.routers import Routers
from tasks.params import Choice, Flag
from tasks.stage import pipeline_settings
from tasks.training import DistillingStage, train_model_name, unused_distill_params

TOGGLES = ("int8", "pruning", "moe", "distill")


def toggle(description: str):
    return Flag(description=description)


class FinalCompressed(DistillingStage):
    TRAINING = DistillingStage.TRAINING + ("int8_grad",)
    int8 = toggle("int8 quantization-aware training (BMQuant)")
    pruning = toggle("hold the PruningMasks 2:4 masks (BMPrune)")
    moe = toggle("fine-tune the ReLU model with MoE routing active (BMMoE); false: the base model, dense")
    distill = toggle("distillation from the base model (BMDistill)")
    int8_grad = Choice(choices=("float", "int8"),
                       description="QAT backward: straight-through in float, or cpm_kernels' int8")

    def upstream(self):
        ups = {"Corpus": Corpus(), "BaseModel": BaseModel()}
        if self.moe:
            ups.update(ReluModel=ReluModel(), Routers=Routers())
        if self.pruning:
            ups["PruningMasks"] = PruningMasks(moefication=self.moe)
        return ups

    def methods(self) -> tuple[str, ...]:
        chosen = {"int8": ("quant", "compressed", "serving"), "pruning": ("prune",), "moe": ("moe",), "distill": ("distill",)}
        return tuple(m for t in TOGGLES if getattr(self, t) for m in chosen[t])

    def unused_params(self) -> set[str]:
        """The training parameters that cannot change this run's output under its toggles."""
        return unused_distill_params(self, self.distill) | (set() if self.int8 else {"int8_grad"})

    def effective_params(self) -> dict:
        return {**self.training_params(), **{t: getattr(self, t) for t in TOGGLES}, "eval_tokens": self.eval_tokens}

    @classmethod
    def instance(cls, params: dict) -> dict:
        return {t: params[t] for t in TOGGLES}

    @property
    def variant(self) -> str:
        """What this run combines, e.g. ``int8 QAT + 2:4 + MoE + KD``."""
        parts = [name for on, name in ((self.int8, "int8 QAT"), (self.pruning, "2:4"), (self.moe, "MoE"),
                                       (self.distill, "KD")) if on]
        return " + ".join(parts) or "fine-tuning"

    def needs(self):
        return self.training_needs(teacher=self.distill, export_int8=self.int8, evaluations=3 if self.int8 else 1,
                                   reference=True)

    def build(self, build, inputs) -> None:
        from pipeline import methods

        corpus, base = inputs["Corpus"], inputs["BaseModel"]
        student = inputs["ReluModel"] if self.moe else base
        name = train_model_name(pipeline_settings().model, ("-relu" if self.moe else "") + ("-int8" if self.int8 else ""))
        args = ["--model", name, "--load", str(student.path), "--data", str(corpus.path)]
        if self.distill:
            args += ["--use-kd", "--load-teacher", str(base.path)]
        if self.pruning:
            masks = inputs["PruningMasks"]
            args += ["--use-pruning", "--prune-func", masks.metrics["prune_func"],
                     "--pruning-mask", str(masks.file(methods.use("prune").PRUNING_MASKS))]
        topk = None
        if self.moe:
            routers = inputs["Routers"]
            topk = routers.metrics["topk"]
            args += ["--moe", str(routers.path), "--moe-topk", str(topk)]
            moe = methods.use("moe")
            for file in (moe.CLUSTERS, moe.ROUTERS):
                shutil.copyfile(routers.file(file), build.path / file)
        self.train(build, *args)
        shutil.copyfile(corpus.file("tokenizer.json"), build.path / "tokenizer.json")
        self.evaluate(build, inputs, topk)

    def evaluate(self, build, inputs, topk) -> None:
        """The trained model as it ran in training (int8 GEMMs, routed FFNs) and, with int8, the
        exported model as deployed and in QAT's arithmetic: each one's perplexity and fidelity to
        the teacher, in one evaluation (the teacher's forward once for all)."""
        from pipeline.evaluate import job
        from pipeline.models import from_pretrained
        from pipeline.train import as_trained

        base = inputs["BaseModel"]
        model = from_pretrained(build.path)
        teacher_bytes = base.file("model.safetensors").stat().st_size
        metrics = {"variant": self.variant, "toggles": {t: getattr(self, t) for t in TOGGLES}, "moe_topk": topk,
                   "hf_bytes": (build.path / "model.safetensors").stat().st_size, "teacher_bytes": teacher_bytes}
        jobs = [job(self.variant, as_trained, path=str(build.path), moe_topk=topk, int8=self.int8)]
        if self.int8:
            with build.timed("export"):
                loader, out, sizes = self.export(build, model, topk, metrics)
            # as deployed (fbgemm, the measured dense/sparse crossover), and in QAT's arithmetic
            jobs += [job(f"compressed, exact={e}", loader, cpu=True, path=str(out), exact=e) for e in (False, True)]
        with build.timed("evaluate"):
            reference = job("teacher", from_pretrained, path=str(base.path))
            teacher = recorded_perplexity(base, self.seq_len, self.eval_tokens)
            jobs += [reference] if teacher is None else []
            results = evaluate(build, jobs, inputs["Corpus"].file("valid.npy"), self.seq_len, self.eval_tokens,
                               reference=reference)
        ours = results[self.variant]
        teacher = teacher if teacher is not None else results["teacher"]["perplexity"]
        metrics.update(teacher_valid_perplexity=round(teacher, 4), valid_perplexity=round(ours["perplexity"], 4),
                       perplexity_ratio=round(ours["perplexity"] / teacher, 4), kl=round(ours["kl"], 5),
                       top1_agreement=round(ours["top1_agreement"], 4),
                       greedy_agreement=round(ours["greedy_agreement"], 2))
        if not self.int8 and not self.moe:  # as trained is as deployed: the same fp32 weights, dense
            metrics["deployed_evaluation"] = deployed_figures(ours)
        if self.int8:
            deployed, exact = (results[f"compressed, exact={e}"] for e in (False, True))
            metrics["deployed_evaluation"] = deployed_figures(deployed)
            metrics.update(compressed_bytes=sizes["bytes"], moe_dense_above=sizes["dense_above"],
                           compressed_sparse_matrices=sizes["sparse_matrices"],
                           moe_decode_path=sizes["decode_path"], moe_gemv_tokens=sizes["gemv_tokens"],
                           int8_gemv_rows=sizes["int8_gemv_rows"], int8_per_token=sizes["int8_per_token"],
                           compressed_size_ratio=round(sizes["bytes"] / teacher_bytes, 4),
                           compressed_valid_perplexity=round(deployed["perplexity"], 4),
                           compressed_perplexity_ratio=round(deployed["perplexity"] / teacher, 4),
                           compressed_exact_valid_perplexity=round(exact["perplexity"], 4))
        zeros = [float((p == 0).float().mean()) for n, p in model.named_parameters() if n.endswith("proj.weight")
                 or ".mlp.fc_" in n and n.endswith("weight")]
        metrics["pruned_weight_zeros"] = round(sum(zeros) / len(zeros), 4)
        build.metrics.update(metrics)

    def export(self, build, model, topk, metrics: dict):
        """The deployable int8 model into ``compressed/``, its paths timed on this machine (the GPU
        kernels' crossovers too, where there is one): (its loader, its directory, export_compressed's sizes)."""
        import torch

        from pipeline import methods

        compressed = methods.use("compressed")
        out = build.path / compressed.COMPRESSED_DIR
        sizes = compressed.export_compressed(model, out, build.path if self.moe else None, topk, calibrate=True)
        shutil.copyfile(build.path / "tokenizer.json", out / "tokenizer.json")
        if torch.cuda.is_available():
            metrics["serving_paths"] = methods.use("serving").record_paths(out, "cuda")["paths"]
        return compressed.load_compressed, out, sizes


def deployed_figures(result: dict) -> dict:
    """The perplexity and fidelity to the teacher of one evaluation result (``pipeline.evaluate.run_jobs``)."""
    return {k: result[k] for k in ("perplexity", "kl", "top1_agreement", "greedy_agreement")}


def recorded_deployed(artifact, seq_len: int, eval_tokens: int) -> dict | None:
    """The perplexity and fidelity to the teacher that a FinalCompressed ``artifact`` measured of
    its model as deployed (the int8 model in ``compressed/``, or the dense weights as they are),
    when measured with these windows and this many tokens: what the Report would measure (the same
    evaluation gives the same figures); else None (a MoE run without int8 has no such record: its
    deployed form, the sparse MoE path, is the Report's to evaluate)."""
    params = artifact.manifest["params"]
    if params.get("seq_len") == seq_len and params.get("eval_tokens") == eval_tokens:
        return artifact.metrics.get("deployed_evaluation")
    return None
