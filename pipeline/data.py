"""Text -> tokens: corpus discovery, the train/valid split, tokenizers and token arrays."""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
from tqdm import tqdm

EOT = "<|endoftext|>"
EXCLUDED_STDLIB_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running interpreter's standard-library ``.py`` sources, without tests or site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = [p for p in root.rglob("*.py")
             if not EXCLUDED_STDLIB_PARTS.intersection(p.relative_to(root).parts)]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def discover(pattern: str) -> tuple[Path, list[Path]]:
    """(root, files) for a glob pattern, or the embedded stdlib corpus when the pattern is empty."""
    if not pattern:
        return stdlib_files()
    files = sorted({Path(p).resolve() for p in globlib.glob(pattern, recursive=True) if Path(p).is_file()})
    if not files:
        raise ValueError(f"Corpus files: the glob {pattern!r} matches no files (expected one or more text files)")
    root = Path(_common_parent(files))
    return root, files


def _common_parent(files: list[Path]) -> str:
    parent = os.path.commonpath([str(f) for f in files])
    return parent if Path(parent).is_dir() else str(Path(parent).parent)


def split(root: Path, files: list[Path], valid_fraction: float) -> tuple[list[Path], list[Path]]:
    """Split by file, deterministically: a file is held out when the hash of its relative path
    falls below ``valid_fraction`` (so adding a file never moves another). At least one file goes
    to each side."""
    if len(files) < 2:
        raise ValueError(f"Corpus files: found {len(files)} file(s), expected at least 2 to split into train and valid")

    def score(p: Path) -> float:
        digest = hashlib.sha256(p.relative_to(root).as_posix().encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    scored = sorted(files, key=score)
    n_valid = sum(score(p) < valid_fraction for p in files)
    n_valid = min(max(n_valid, 1), len(files) - 1)
    valid = set(scored[:n_valid])
    splits = [p for p in files if p not in valid], [p for p in files if p in valid]
    for name, part in zip(("train", "valid"), splits):
        if not any(p.stat().st_size for p in part):
            shown = ", ".join(str(p) for p in part[:3]) + (", ..." if len(part) > 3 else "")
            raise ValueError(f"Corpus files: the {name} split ({len(part)} file(s): {shown}) holds no text, only "
                             f"empty files; expected text in both splits (add files or change valid_fraction)")
    return splits


def file_list_hash(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + str(p.stat().st_size).encode() + b"\n")
    return h.hexdigest()[:16]


def read_text(path: Path) -> str:
    """A corpus file's text: UTF-8, refused when it is not (a replacement character would be
    trained on silently) or when it holds NUL bytes (a binary file, tokenised as text)."""
    raw = path.read_bytes()
    if b"\0" in raw:
        raise ValueError(f"Corpus files: {path} holds NUL bytes at offset {raw.index(0)}, so it is binary, not text "
                         f"(expected UTF-8 text files; narrow the glob)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"Corpus files: {path} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         f"expected UTF-8 text files (convert it, e.g. iconv -f latin1 -t utf-8)") from None


def check_texts(files: list[Path], max_bytes: int = 0) -> None:
    """Read what a split will read, so that a bad file is refused before any tokenizer is trained."""
    for _ in _texts(files, max_bytes):
        pass


def train_tokenizer(files: list[Path], vocab_size: int, max_bytes: int = 0):
    """A byte-level BPE tokenizer (as GPT-J's), trained on ``files``; ``<|endoftext|>`` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(files, max_bytes), trainer=trainer)
    return tok


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a valid tokenizers tokenizer.json ({e})") from e


def _texts(files: list[Path], max_bytes: int):
    """Each file's text, in order; with ``max_bytes``, that many characters in all (the last file cut)."""
    total = 0
    for p in files:
        text = read_text(p)
        if max_bytes:
            text = text[:max_bytes - total]
        yield text
        total += len(text)
        if max_bytes and total >= max_bytes:
            return


def tokens_per_byte(tokenizer, files: list[Path], sample_bytes: int = 1 << 20) -> float:
    """The tokens per byte of text (end-of-text tokens included) that ``tokenizer`` makes on whole
    files picked evenly from ``files`` until about ``sample_bytes`` are read; 1 without files."""
    step, texts, read = max(1, len(files) // 64), [], 0
    for p in files[::step]:
        data = p.read_bytes()
        texts.append(data.decode("utf-8", errors="replace"))  # what cannot be read is refused by the build
        read += len(data)
        if read >= sample_bytes:
            break
    if not read:
        return 1.0
    return sum(len(enc.ids) + 1 for enc in tokenizer.encode_batch(texts)) / read


def token_dtype(vocab_size: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise ValueError(f"vocabulary of {vocab_size} tokens does not fit in 32 bits")


BATCH_FILES = 64  # files encoded together
NPY_HEADER = 128  # bytes: a version 1.0 header for a 1-D array of up to 20-digit length


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    """The .npy header of a 1-D array of ``n`` items, always NPY_HEADER bytes, so that the data can
    be written before ``n`` is known (numpy's own header for such an array, padded the same way)."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': (%d,), }" % (dtype.str, n)
    text = text.ljust(NPY_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def tokenize_to_npy(tokenizer, files: list[Path], out: Path, max_bytes: int = 0, desc: str = "tokenize") -> int:
    """Encode ``files`` (each followed by the end-of-text token) into one ``.npy`` token array,
    streamed into place (memory stays bounded by one batch of files; no second copy on disk).
    Returns the number of tokens written."""
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"the tokenizer has no {EOT} token")
    dtype = token_dtype(tokenizer.get_vocab_size())
    n = 0
    with open(out, "wb") as f:
        f.write(_npy_header(dtype, 0))
        batch: list[str] = []

        def flush():
            nonlocal n
            for enc in tokenizer.encode_batch(batch):
                ids = np.asarray(enc.ids + [eot], dtype=dtype)
                f.write(ids.tobytes())
                n += len(ids)
            batch.clear()

        for text in tqdm(_texts(files, max_bytes), total=len(files), desc=desc, unit="file", leave=False):
            batch.append(text)
            if len(batch) == BATCH_FILES:
                flush()
        flush()
        f.seek(0)
        f.write(_npy_header(dtype, n))
    return n


def budget_split(token_budget: int, heldout_fraction: float, sizes: dict[str, int],
                 at_most: bool = False) -> dict[str, int]:
    """The tokens a budget takes from each split ({"train": n, "valid": n}), refused when a split
    of ``sizes`` (its token count; with ``at_most``, an upper bound of it) holds fewer."""
    heldout = int(round(token_budget * heldout_fraction))
    need = {"train": token_budget - heldout, "valid": heldout}
    for name, n in need.items():
        if n > sizes[name] - 1:
            holds = f"at most {sizes[name]} (a token per byte of its text)" if at_most else sizes[name]
            raise ValueError(f"token budget: {n} tokens asked of the {name} split, which holds {holds}; "
                             f"lower token_budget or heldout_fraction")
    return need


def load_tokens(path: Path) -> np.ndarray:
    """A token array, memory-mapped (never unpickled)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
