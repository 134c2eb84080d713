"""lm-evaluation-harness for the pipeline's models: ``PipelineLM`` (registered as ``bmcook``)
scores any model the pipeline loads (a compressed int8 / MoE directory, a FinalCompressed artifact,
a dense Hugging Face directory) with its own tokenizer, on the CPU:

    lm_eval --model bmcook --model_args path=artifacts/FinalCompressed/<version> --tasks local_mc \\
        --include_path tests/harness

(``python -m pipeline.harness`` is the same command with this model class registered; dense
artifacts also work with ``--model hf``.) The Report runs the tasks of its ``harness_tasks`` on
every row through ``evaluate_rows``. Needs the ``lm-eval`` package (``pip install -e '.[harness]'``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from pipeline.data import EOT


@register_model("bmcook")
class PipelineLM(TemplateLM):
    """A pipeline model and its tokenizer as an lm-eval model: loglikelihoods of whole sequences
    (at most ``max_length`` tokens, the model's ``n_positions`` by default), rolling
    loglikelihoods over disjoint windows, and greedy generation."""

    def __init__(self, path: str | None = None, model=None, tokenizer=None, max_length: int | None = None,
                 moe_path: str = "auto", max_gen_toks: int = 64, **kwargs):
        super().__init__()
        from pipeline import data, generate

        if model is None:
            if path is None:
                raise ValueError("bmcook: give path=<a model or FinalCompressed artifact directory>")
            directory = generate.resolve(Path(path))
            model = generate.load_model(directory, moe_path)
            found = [p / generate.TOKENIZER for p in (directory, Path(path)) if (p / generate.TOKENIZER).is_file()]
            if tokenizer is None and not found:
                raise ValueError(f"bmcook: {path} has no {generate.TOKENIZER}; give tokenizer=<its tokenizer.json>")
            tokenizer = tokenizer or found[0]
        self.model = model.eval()
        self.tokenizer = data.load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self._max_length = int(max_length or model.config.n_positions)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.token_to_id(EOT)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(log-probability of ``continuation`` after ``context``, whether it is the greedy choice)."""
        whole = (context + continuation)[-(self.max_length + 1):]
        logits = self.model(torch.tensor([whole[:-1]]))[0, -len(continuation):].float()
        target = torch.tensor(continuation)
        logprobs = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
        return float(logprobs.sum()), bool((logits.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return [self._score(context, continuation) for _, context, continuation in
                tqdm(requests, desc="loglikelihood", disable=disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling", disable=disable_tqdm):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1))
            results.append(sum(self._score(context, continuation)[0] for context, continuation in windows))
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, options in tqdm([r.args for r in requests], desc="generate_until", disable=disable_tqdm):
            stops = options.get("until") or [EOT]
            stops = [stops] if isinstance(stops, str) else stops
            ids, new = self.tok_encode(context), []
            for _ in range(int(options.get("max_gen_toks", self.max_gen_toks))):
                window = torch.tensor([(ids + new)[-self.max_length:]])
                new.append(int(self.model(window)[0, -1].argmax()))
                text = self.tok_decode(new)
                if new[-1] == self.eot_token_id or any(s in text for s in stops):
                    break
            text = self.tok_decode(new)
            for stop in stops:
                text = text.split(stop)[0]
            out.append(text)
        return out


def evaluate_rows(rows: list[tuple[str, object]], tokenizer: Path, tasks: list[str], include_path: Path | None = None,
                  limit: int | None = None) -> dict[str, dict]:
    """{row: {task: {metric: value}}} of the harness's ``tasks`` for each ``(name, load)`` in
    ``rows`` (``load()`` returns the model; one is held at a time)."""
    import gc

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = {}
    for name, load in rows:
        lm = PipelineLM(model=load(), tokenizer=tokenizer)
        found = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, bootstrap_iters=0)
        results[name] = {task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and "_stderr" not in k}
                         for task, metrics in found["results"].items()}
        del lm
        gc.collect()
    return results


def main(argv: list[str] | None = None) -> int:
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
