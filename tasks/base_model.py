"""BaseModel: pretrain a preset from scratch on the Corpus (under torchrun), or import a checkpoint."""
from __future__ import annotations

import functools
import shutil


from pipeline.artifacts import content_hash
from tasks.corpus import Corpus
from tasks.ranks import evaluate
from tasks.stage import pipeline_settings

IMPORT_ONLY = {"gpt-j"}  # presets too large to pretrain from scratch here: they need a checkpoint
from tasks.training import TrainingStage, train_model_name


class BaseModel(TrainingStage):
    def upstream(self):
        return {"Corpus": Corpus()}

    @classmethod
    def lineage(cls, params: dict) -> dict:
        """The model preset, or the checkpoint imported: which model everything downstream compresses."""
        return {k: params[k] for k in ("model", "checkpoint_sha256") if k in params}

    def effective_params(self) -> dict:
        from pipeline.models.presets import get_preset

        settings = pipeline_settings()
        preset = get_preset(settings.model)
        checkpoint = settings.checkpoint_dir()
        if settings.model in IMPORT_ONLY and not checkpoint:
            raise ValueError(f"the {settings.model} preset is GPT-J-6B ({preset.num_params() / 1e9:.2f}e9 parameters), "
                             f"which this pipeline compresses from a pretrained checkpoint rather than pretraining "
                             f"it: pass CHECKPOINT=/path/to/gpt-j-6b (make) or --pipeline-checkpoint (luigi), a "
                             f"Hugging Face GPT-J directory")
        params = {"model": settings.model, "eval_tokens": self.eval_tokens, "seq_len": self.seq_len}
        if checkpoint:
            check_checkpoint(checkpoint, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                               for p in sorted(checkpoint.iterdir()) if p.is_file()))
            params["checkpoint_sha256"] = content_hash(checkpoint)
            return params
        return {**params, **self.training_params()}

    def needs(self):
        from pipeline import resources

        if pipeline_settings().checkpoint_dir():
            student = self.model_bytes()
            flops, rank = self.evaluation_needs(1, self.eval_tokens)
            return resources.Needs(student, 1.25 * student, "the imported checkpoint in fp32", flops, rank)
        return self.training_needs()

    def build(self, build, inputs) -> None:
        from pipeline import data
        from pipeline.evaluate import job
        from pipeline.models import from_pretrained, save_pretrained
        from pipeline.models.config import checkpoint_config

        settings = pipeline_settings()
        corpus = inputs["Corpus"]
        checkpoint = settings.checkpoint_dir()
        if checkpoint:
            with build.timed("import"):
                vocab = data.load_tokenizer(corpus.file("tokenizer.json")).get_vocab_size()
                if vocab > checkpoint_config(checkpoint).vocab_size:
                    raise ValueError(f"CHECKPOINT {checkpoint}: tokenizer.json has {vocab} tokens but config.json "
                                     f"field 'vocab_size' is {checkpoint_config(checkpoint).vocab_size}")
                save_pretrained(from_pretrained(checkpoint), build.path)
            build.extra["source"] = {"checkpoint": str(checkpoint)}
        else:
            self.train(build, "--model", train_model_name(settings.model), "--data", str(corpus.path))
        shutil.copyfile(corpus.file("tokenizer.json"), build.path / "tokenizer.json")
        with build.timed("evaluate"):
            [result] = evaluate(build, [job("valid perplexity", from_pretrained, path=str(build.path))],
                                corpus.file("valid.npy"), self.seq_len, self.eval_tokens).values()
        build.metrics.update({"valid_loss": round(result["loss"], 5), "valid_perplexity": round(result["perplexity"], 4),
                              "valid_tokens": result["tokens"],
                              "parameters": checkpoint_config(build.path).num_params()})


@functools.lru_cache(maxsize=None)
def check_checkpoint(path, stamp: tuple) -> None:
    """Every tensor of the checkpoint present with its shape and every weight file whole, from the
    headers, while the graph is computed (before any stage runs); once per process while its
    files (``stamp``) are unchanged."""
    from pipeline.models.hf import check_checkpoint_files

    check_checkpoint_files(path)


def recorded_perplexity(artifact, seq_len: int, eval_tokens: int) -> float | None:
    """The validation perplexity a BaseModel ``artifact`` recorded, when it was measured with these
    windows and this many tokens (the same evaluation gives the same number); else None."""
    params = artifact.manifest["params"]
    if params.get("seq_len") == seq_len and params.get("eval_tokens") == eval_tokens:
        return artifact.metrics["valid_perplexity"]
    return None
