"""Moefied: the ReLU model run as a mixture of experts, evaluated against the dense model at
several top-k, with the MLP routers, with groundtruth selection and on a random split."""
from __future__ import annotations

from tasks.corpus import Corpus, check_windows
from tasks.relu_model import ReluModel
from tasks.routers import Routers
from tasks.params import Count, SeqLen
from tasks.stage import Stage


class Moefied(Stage):
    eval_tokens = Count(at_least="seq_len", description="validation tokens per perplexity")
    seq_len = SeqLen()

    def upstream(self):
        return {"Corpus": Corpus(), "ReluModel": ReluModel(), "Routers": Routers(),
                "RandomRouters": Routers(cluster_method="random")}

    def effective_params(self) -> dict:
        return {"eval_tokens": self.eval_tokens, "seq_len": self.seq_len}

    def check_inputs(self, inputs) -> None:
        if "Corpus" in inputs:
            check_windows(inputs["Corpus"], self.seq_len, ("valid",))

    def build(self, build, inputs) -> None:
        from pipeline.data import load_tokens
        from pipeline.models import from_pretrained
        from pipeline.moefication.evaluation import evaluate_moe, write_report

        routers = inputs["Routers"]
        model = from_pretrained(inputs["ReluModel"].path).eval()
        valid = load_tokens(inputs["Corpus"].path / "valid.npy")
        with build.timed("evaluate"):
            metrics = evaluate_moe(model, {"clustered": routers.path, "random": inputs["RandomRouters"].path},
                                   routers.metrics["num_expert"], valid, self.seq_len, self.eval_tokens)
        metrics.update({k: routers.metrics[k] for k in ("mean_router_coverage", "mean_groundtruth_coverage",
                                                          "mean_coverage_ratio")})
        build.metrics.update(metrics)
        write_report(metrics, build.path, f"MoEfication of {model.config.n_layer}-layer ReLU GPT-J")
