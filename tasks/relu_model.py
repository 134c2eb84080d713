"""ReluModel: the BaseModel with ReLU in every FFN, fine-tuned with LM loss plus distillation from
the BaseModel (the seed's "transform the activation function from GeLU to ReLU")."""
from __future__ import annotations

import shutil


from tasks.base_model import BaseModel
from tasks.corpus import Corpus
from tasks.ranks import evaluate
from tasks.stage import pipeline_settings
from tasks.training import DistillingStage, train_model_name, unused_distill_params


class ReluModel(DistillingStage):

    def upstream(self):
        return {"Corpus": Corpus(), "BaseModel": BaseModel()}

    def methods(self) -> tuple[str, ...]:
        return ("distill",)

    def unused_params(self) -> set[str]:
        return unused_distill_params(self, distill=True)

    def effective_params(self) -> dict:
        return {**self.training_params(), "eval_tokens": self.eval_tokens}

    def needs(self):
        return self.training_needs(teacher=True, evaluations=2)

    def build(self, build, inputs) -> None:
        from pipeline.evaluate import job
        from pipeline.models import from_pretrained

        corpus, base = inputs["Corpus"], inputs["BaseModel"]
        self.train(build, "--model", train_model_name(pipeline_settings().model, "-relu"), "--load", str(base.path),
                   "--use-kd", "--load-teacher", str(base.path), "--data", str(corpus.path))
        shutil.copyfile(corpus.file("tokenizer.json"), build.path / "tokenizer.json")
        jobs = [job("ReLU model", from_pretrained, ffn_sparsity=True, path=str(build.path)),
                job("teacher", from_pretrained, ffn_sparsity=True, path=str(base.path))]
        with build.timed("evaluate"):
            results = evaluate(build, jobs, corpus.file("valid.npy"), self.seq_len, self.eval_tokens)
        student, teacher = results["ReLU model"], results["teacher"]
        sparsity = student["ffn_sparsity"]
        build.metrics.update({
            "valid_perplexity": round(student["perplexity"], 4),
            "teacher_valid_perplexity": round(teacher["perplexity"], 4),
            "perplexity_ratio": round(student["perplexity"] / teacher["perplexity"], 4),
            "ffn_sparsity": [round(x, 4) for x in sparsity],
            "mean_ffn_sparsity": round(sum(sparsity) / len(sparsity), 4),
            "teacher_ffn_nonpositive": [round(x, 4) for x in teacher["ffn_sparsity"]],
            "valid_tokens": student["tokens"],
        })
