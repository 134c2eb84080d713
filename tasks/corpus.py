"""Corpus: text files -> tokenizer.json + train/valid token arrays."""
from __future__ import annotations

import platform
import shutil
from pathlib import Path

import luigi

from pipeline import data
from pipeline.artifacts import sha256_file
from tasks.params import Count, Number
from tasks.stage import Stage, pipeline_settings


def checkpoint_tokenizer(checkpoint: Path) -> Path:
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"CHECKPOINT {checkpoint}: {path} is missing; a GPT-J checkpoint must bring "
                         f"its tokenizer as tokenizer.json")
    return path


class Corpus(Stage):
    files = luigi.Parameter(description="glob of text files; empty: the interpreter's standard library")
    valid_fraction = Number(above=0, below=1, description="share of files held out for validation")
    max_bytes = Count(zero="all", description="stop reading each split after this many characters (0: all)")

    @classmethod
    def lineage(cls, params: dict) -> dict:
        """The vocabulary the tokens are in: the preset's size, or a checkpoint's tokenizer."""
        return {k: params[k] for k in ("vocab_size", "tokenizer_sha256") if k in params}

    def effective_params(self) -> dict:
        from pipeline.models.presets import get_preset

        root, files = data.discover(self.files)
        data.split(root, files, self.valid_fraction)  # both splits hold text
        params = {"files": self.files, "valid_fraction": self.valid_fraction, "max_bytes": self.max_bytes,
                  "file_list": data.file_list_hash(root, files)}
        if not self.files:
            params["python"] = platform.python_version()
        checkpoint = pipeline_settings().checkpoint_dir()
        if checkpoint:
            params["tokenizer_sha256"] = sha256_file(checkpoint_tokenizer(checkpoint))
        else:
            params["vocab_size"] = get_preset(pipeline_settings().model).vocab_size
        return params

    def needs(self):
        from pipeline.resources import Needs

        root, files = data.discover(self.files)
        chars = sum(p.stat().st_size for p in files)
        if self.max_bytes:
            chars = min(chars, 2 * self.max_bytes)
        # at most a token per character, in the token dtype, plus the raw file streamed before the .npy
        width = 4 if "tokenizer_sha256" in self.spec().params else data.token_dtype(self.spec().params["vocab_size"]).itemsize
        return Needs(2 * chars * width, 4 * chars, f"{chars / 1e6:.1f} MB of text, a token per character at most")

    def build(self, build, inputs) -> None:
        root, files = data.discover(self.files)
        train, valid = data.split(root, files, self.valid_fraction)
        with build.timed("check"):
            data.check_texts(train, self.max_bytes)
            data.check_texts(valid, self.max_bytes)
        tok_path = build.path / "tokenizer.json"
        with build.timed("tokenizer"):
            if "vocab_size" in self.spec().params:
                data.train_tokenizer(train, self.spec().params["vocab_size"], self.max_bytes).save(str(tok_path))
            else:
                shutil.copyfile(checkpoint_tokenizer(pipeline_settings().checkpoint_dir()), tok_path)
        tokenizer = data.load_tokenizer(tok_path)
        with build.timed("tokenize"):
            n_train = data.tokenize_to_npy(tokenizer, train, build.path / "train.npy", self.max_bytes, "train split")
            n_valid = data.tokenize_to_npy(tokenizer, valid, build.path / "valid.npy", self.max_bytes, "valid split")
        data.write_json(build.path / "files.json", {"root": str(root),
                                                    "train": [str(p.relative_to(root)) for p in train],
                                                    "valid": [str(p.relative_to(root)) for p in valid]})
        build.metrics.update({
            "files_train": len(train), "files_valid": len(valid),
            "tokens_train": n_train, "tokens_valid": n_valid,
            "vocab_size": tokenizer.get_vocab_size(),
            "token_dtype": str(data.token_dtype(tokenizer.get_vocab_size())),
            "python": platform.python_version(), "file_list": self.spec().params["file_list"],
        })


def split_tokens(corpus) -> dict[str, int]:
    """The tokens in each split of a published Corpus: {"train": n, "valid": n}."""
    return {"train": corpus.metrics["tokens_train"], "valid": corpus.metrics["tokens_valid"]}


def check_windows(corpus, seq_len: int, splits=("train", "valid")) -> None:
    """Refuse a corpus split too short for one window of ``seq_len`` tokens (and its target)."""
    for name, n in split_tokens(corpus).items():
        if name in splits and n < seq_len + 1:
            raise ValueError(f"the Corpus {name} split holds {n} tokens, fewer than one window of seq_len "
                             f"{seq_len} + 1; add text to the {name} files or lower seq_len")
