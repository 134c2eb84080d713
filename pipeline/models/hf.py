"""Read and write Hugging Face style GPT-J checkpoint directories.

A directory holds config.json plus weights in one of the layouts below. The same
layout (config.json + model.safetensors) is the pipeline's own model artifact format.
"""

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.cli import UsageError

from .config import WEIGHT_FILES, CheckpointError, GPTJConfig, checkpoint_config, checkpoint_dir
from .gptj import GPTJ

def _read_weight_file(file, mmap: bool = False):
    """Load one .safetensors or .bin file into a dict name -> CPU tensor (``mmap``: a .bin file's
    tensors mapped, not read)."""
    if file.suffix == ".safetensors":
        try:
            return load_file(file, device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
    try:
        # weights_only: never unpickle arbitrary objects from a checkpoint
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot load as a weights-only PyTorch state dict ({e})") from None
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise CheckpointError(f"{file}: expected a dict of tensor names to tensors")
    return sd


def _shard_files(index_file):
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_file}: not a valid shard index with a 'weight_map' ({e!r})") from None
    files = []
    for shard in shards:
        file = index_file.parent / shard
        if not file.is_file():
            raise CheckpointError(f"{index_file}: shard '{shard}' listed in weight_map does not exist")
        files.append(file)
    return files


def _load_weights(path):
    """Returns (state_dict, weights_file, origin) where origin maps each key to the file it came from."""
    for name in WEIGHT_FILES:
        weights_file = path / name
        if weights_file.is_file():
            break
    else:
        raise CheckpointError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)})")

    files = _shard_files(weights_file) if name.endswith(".index.json") else [weights_file]
    sd, origin = {}, {}
    for file in files:
        for key, tensor in _read_weight_file(file).items():
            # old HF GPT-J checkpoints store the causal mask as buffers; we build it on the fly
            if key.endswith(".attn.bias") or key.endswith(".attn.masked_bias"):
                continue
            sd[key] = tensor
            origin[key] = file
    return sd, weights_file, origin


def load_state_dict_from_dir(path):
    """Read the weights of a Hugging Face style model directory into a dict name -> CPU tensor."""
    sd, _, _ = _load_weights(checkpoint_dir(path))
    return sd


def read_tensors(path, names=None) -> dict:
    """The tensors ``names`` that a Hugging Face style model directory holds (absent names left
    out; None: the names alone, each mapped to None), read one by one from its safetensors files
    without loading the rest (a .bin checkpoint is loaded whole)."""
    from safetensors import safe_open

    path = checkpoint_dir(path)
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            break
    else:
        raise CheckpointError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)})")
    files = _shard_files(path / name) if name.endswith(".index.json") else [path / name]
    if any(f.suffix != ".safetensors" for f in files):
        sd = _load_weights(path)[0]
        return {n: (None if names is None else sd[n]) for n in (sd if names is None else names) if n in sd}
    found = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                keys = f.keys() if names is None else set(names) & set(f.keys())
                found.update({n: None if names is None else f.get_tensor(n) for n in keys})
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
    return found


def _expected(config) -> dict:
    """{name: tensor on the meta device} of a GPT-J model of ``config``."""
    with torch.device("meta"):
        return GPTJ(config).state_dict()


def check_tensors(found: dict, origin: dict, expected: dict, weights_file, config_file) -> None:
    """Refuse, in one sentence, tensors that do not make the model of ``config_file``: ``found``
    maps each name to its (shape, dtype), ``origin`` to the file holding it."""
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{weights_file}: missing tensor '{missing[0]}'{more} required by {config_file}")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        key = unexpected[0]
        raise CheckpointError(f"{origin[key]}: unexpected tensor '{key}', not part of a GPT-J model")
    for key in expected:  # model order, so the first bad tensor reported is the earliest in the network
        shape, dtype = found[key]
        if tuple(shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{origin[key]}: tensor '{key}' has shape {tuple(shape)}, "
                                  f"expected {tuple(expected[key].shape)} from {config_file}")
        if not dtype.is_floating_point:
            raise CheckpointError(f"{origin[key]}: tensor '{key}' has dtype {dtype}, expected a floating-point type")


def _tie(found: dict, origin: dict, hf_config: dict) -> None:
    """A checkpoint with tied embeddings stores no lm_head: it is the input embedding's copy."""
    if "lm_head.weight" not in found and hf_config.get("tie_word_embeddings") and "transformer.wte.weight" in found:
        value = found["transformer.wte.weight"]
        found["lm_head.weight"] = value.clone() if isinstance(value, torch.Tensor) else value
        origin["lm_head.weight"] = origin["transformer.wte.weight"]


def check_checkpoint_files(path) -> None:
    """Every tensor of a checkpoint directory present, with the shape its config asks for, and
    every weight file whole: from the safetensors headers (no weight is read), before any work."""
    path = checkpoint_dir(path)
    config, hf_config = checkpoint_config(path, with_raw=True)
    weights_file = next(path / n for n in WEIGHT_FILES if (path / n).is_file())
    files = _shard_files(weights_file) if weights_file.name.endswith(".index.json") else [weights_file]
    found, origin = {}, {}
    for file in files:
        for name, shape_dtype in _header_tensors(file).items():
            if not name.endswith((".attn.bias", ".attn.masked_bias")):
                found[name], origin[name] = shape_dtype, file
    _tie(found, origin, hf_config)
    check_tensors(found, origin, _expected(config), weights_file, path / "config.json")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _header_tensors(file) -> dict:
    """{name: (shape, dtype)} of one weight file, from its header alone (a .bin file is mapped,
    not read); a safetensors file shorter than its header says is refused as truncated."""
    if file.suffix != ".safetensors":
        try:
            tensors = _read_weight_file(file, mmap=True)
        except CheckpointError:  # a file in the legacy (non-zip) format cannot be mapped: read it
            tensors = _read_weight_file(file)
        return {k: (t.shape, t.dtype) for k, t in tensors.items()}
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 <= size and n <= size - 8 else None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read its safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (its header is cut short or missing)")
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if size < 8 + n + end:
        raise CheckpointError(f"{file} is {size} bytes, and its header describes {8 + n + end}: the file is "
                              f"truncated (copy it again)")
    return {k: (info["shape"], _SAFETENSORS_DTYPES.get(info["dtype"], torch.uint8)) for k, info in header.items()}


def from_pretrained(path, dtype=torch.float32):
    """Load a GPT-J model from a Hugging Face style directory (config.json + weights).

    dtype: floating-point tensors are converted to it; None keeps the stored dtypes.
    """
    path = checkpoint_dir(path)
    config, hf_config = checkpoint_config(path, with_raw=True)
    sd, weights_file, origin = _load_weights(path)
    _tie(sd, origin, hf_config)
    expected = _expected(config)  # built without memory; the checkpoint tensors become the parameters
    check_tensors({k: (t.shape, t.dtype) for k, t in sd.items()}, origin, expected, weights_file,
                  path / "config.json")
    for key in expected:
        check_finite(sd[key], key, origin[key])
        if dtype is not None:
            sd[key] = sd[key].to(dtype)
    with torch.device("meta"):
        model = GPTJ(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.reset_rope_()
    return model.eval()


def check_finite(tensor, name: str, source) -> None:
    """Refuse a weight holding NaN or infinite values, by name: trained on, it poisons every stage after it."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(f"{source}: tensor '{name}' holds {int(bad.sum())} NaN or infinite value(s) (the first "
                              f"at index {first}: {tensor[first].item()}); expected finite weights")


def save_pretrained(model, path, dtype=None):
    """Write config.json and model.safetensors (HF names). dtype: convert weights to it; None keeps them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, storages = {}, set()
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        # safetensors refuses tensors that share memory (e.g. tied weights)
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    hf_config = model.config.to_hf_dict()
    hf_config["torch_dtype"] = str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def read_weights(path: Path, what: str) -> tuple[dict, GPTJConfig | None]:
    """(state dict, config or None) from a model directory, a .safetensors file or a weights-only
    pickle (``--load`` of the seed's command lines); never unpickles anything but tensors."""
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if path.is_dir():
        return load_state_dict_from_dir(path), checkpoint_config(path)
    if path.suffix == ".safetensors":
        return load_file(str(path)), None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UsageError(f"{what} {path} is not a weights-only checkpoint; refusing to unpickle it "
                         f"({str(e).splitlines()[0]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{what} {path} does not hold a state dict of tensors")
    return state, None
