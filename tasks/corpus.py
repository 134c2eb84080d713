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

    def token_bounds(self) -> dict[str, int]:
        """At most how many tokens each split will hold, from its files' sizes before any is read:
        a token per byte of text (byte-level BPE, or a tokenizer falling back to bytes), and one
        more per file."""
        root, files = data.discover(self.files)
        bounds = {}
        for name, split in zip(("train", "valid"), data.split(root, files, self.valid_fraction)):
            size = sum(p.stat().st_size for p in split)
            bounds[name] = (min(size, self.max_bytes) if self.max_bytes else size) + len(split)
        return bounds

    def needs(self):
        from pipeline.resources import PYTHON_BYTES, Needs

        root, files = data.discover(self.files)
        sizes = sorted(p.stat().st_size for p in files)
        chars = min(sum(sizes), 2 * self.max_bytes) if self.max_bytes else sum(sizes)
        if "vocab_size" in self.spec().params:  # the tokenizer is trained on all the text
            vocab, held = self.spec().params["vocab_size"], 4 * chars
            tokenizer, per_byte, how = 80 * vocab, 1.0, "a token per byte at most"  # byte-level BPE
        else:  # the checkpoint's tokenizer, measured on a sample, encodes a batch of files at a time
            path = checkpoint_tokenizer(pipeline_settings().checkpoint_dir())
            encoder = data.load_tokenizer(path)
            vocab, held = encoder.get_vocab_size(), 4 * min(chars, sum(sizes[-data.BATCH_FILES:]))
            tokenizer, per_byte = path.stat().st_size, min(1.0, 1.25 * data.tokens_per_byte(encoder, files))
            how = f"{per_byte:.2f} tokens per byte (a sample's, and a quarter more)"
        disk = (chars * per_byte + len(files)) * data.token_dtype(vocab).itemsize + 2 * data.NPY_HEADER + tokenizer
        return Needs(disk, held, f"{chars / 1e6:.1f} MB of text, {how}", process=PYTHON_BYTES)

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
