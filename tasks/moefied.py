"""Moefied: the ReLU model run as a mixture of experts, evaluated against the dense model at
several top-k, with the MLP routers, with groundtruth selection and on a random split."""
from __future__ import annotations

from tasks.corpus import Corpus, check_windows
from tasks.ranks import evaluate
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

    def needs(self):
        from pipeline.moefication.evaluation import FRACTIONS, SETTINGS
        from pipeline.resources import Needs

        model = self.model_bytes()
        flops, rank = self.evaluation_needs(1 + len(FRACTIONS) * len(SETTINGS), self.eval_tokens)
        return Needs(2**20, 2 * model, "one model and its MoE copy for the sparse-path check", flops, rank)

    def check_inputs(self, inputs) -> None:
        if "Corpus" in inputs:
            check_windows(inputs["Corpus"], self.seq_len, ("valid",))

    def build(self, build, inputs) -> None:
        from pipeline.data import load_tokens
        from pipeline.models.config import checkpoint_config
        from pipeline.moefication.evaluation import moe_jobs, moe_table, sparse_vs_simulation, topk_for, write_report

        routers, relu = inputs["Routers"], inputs["ReluModel"]
        num_expert = routers.metrics["num_expert"]
        valid = inputs["Corpus"].file("valid.npy")
        with build.timed("evaluate"):
            jobs = moe_jobs(relu.path, {"clustered": routers.path, "random": inputs["RandomRouters"].path}, num_expert)
            metrics = moe_table(evaluate(build, jobs, valid, self.seq_len, self.eval_tokens), num_expert,
                                self.eval_tokens)
            metrics["sparse_max_abs_diff"] = sparse_vs_simulation(relu.path, routers.path, num_expert,
                                                                  topk_for(0.2, num_expert),
                                                                  load_tokens(valid)[:self.seq_len])
        metrics.update({k: routers.metrics[k] for k in ("mean_router_coverage", "mean_groundtruth_coverage",
                                                          "mean_coverage_ratio")})
        build.metrics.update(metrics)
        write_report(metrics, build.path, f"MoEfication of {checkpoint_config(relu.path).n_layer}-layer ReLU GPT-J")
