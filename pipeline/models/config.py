"""GPT-J model configuration and its mapping to/from Hugging Face config.json."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

ACTIVATIONS = ("gelu_new", "relu")
# Weight layouts of a Hugging Face model directory, in order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A checkpoint directory or its config/weights is missing or malformed."""


@dataclass
class GPTJConfig:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    rotary_dim: int
    n_inner: int  # FFN width (d_ff)
    activation: str = "gelu_new"  # 'gelu_new' or 'relu'
    layer_norm_epsilon: float = 1e-5
    # the end-of-text token: id 0 in the presets' tokenizers (pipeline.data.EOT), GPT-J's 50256 in its own
    eos_token_id: int = 0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation is {self.activation!r}, expected 'gelu_new' or 'relu'")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})")
        if self.rotary_dim % 2 != 0 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must be even and at most head_dim ({self.head_dim})")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id ({self.eos_token_id}) is outside the vocabulary of {self.vocab_size}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def num_params(self):
        """Exact parameter count of GPTJ(config): embeddings, blocks, final LN, lm_head (with bias)."""
        d, f, v = self.n_embd, self.n_inner, self.vocab_size
        per_layer = 2 * d + 4 * d * d + (d * f + f) + (f * d + d)  # ln_1, attn (no bias), fc_in, fc_out
        return v * d + self.n_layer * per_layer + 2 * d + (d * v + v)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    def to_hf_dict(self):
        return {
            "model_type": "gptj",
            "architectures": ["GPTJForCausalLM"],
            "activation_function": self.activation,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
            "n_positions": self.n_positions,
            "rotary_dim": self.rotary_dim,
            "n_inner": self.n_inner,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "tie_word_embeddings": False,
            "bos_token_id": self.eos_token_id,  # GPT-J's convention: one token begins and ends a text
            "eos_token_id": self.eos_token_id,
        }

    @classmethod
    def from_hf_dict(cls, d, source="config.json"):
        """Build a config from a parsed HF GPT-J config.json, raising CheckpointError on bad input."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(d).__name__}")

        model_type = d.get("model_type")
        if model_type is None:
            raise CheckpointError(f"{source}: field 'model_type' is missing, expected 'gptj'")
        if model_type != "gptj":
            raise CheckpointError(
                f"{source}: field 'model_type' is {model_type!r}, expected 'gptj' "
                "(this pipeline handles GPT-J checkpoints only)"
            )

        def positive_int(name):
            value = d[name]
            # bool is a subclass of int in Python, but `true` is never a valid size
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{source}: field {name!r} is {value!r}, expected a positive integer")
            return value

        fields = {}
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim"):
            if name not in d:
                raise CheckpointError(f"{source}: required field {name!r} is missing (expected a positive integer)")
            fields[name] = positive_int(name)
        # HF semantics: n_inner absent or null means 4 * n_embd
        fields["n_inner"] = positive_int("n_inner") if d.get("n_inner") is not None else 4 * fields["n_embd"]

        if "activation_function" not in d:
            raise CheckpointError(f"{source}: required field 'activation_function' is missing (expected 'gelu_new' or 'relu')")
        act = d["activation_function"]
        if act not in ACTIVATIONS:
            raise CheckpointError(f"{source}: field 'activation_function' is {act!r}, expected 'gelu_new' or 'relu'")

        eps = d.get("layer_norm_epsilon", 1e-5)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise CheckpointError(f"{source}: field 'layer_norm_epsilon' is {eps!r}, expected a positive number")

        eos = d.get("eos_token_id")
        if not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < fields["vocab_size"]:
            # absent, null, or transformers' default 50256 written into a smaller model's config
            eos = 50256 if fields["vocab_size"] > 50256 else 0
        try:
            return cls(**fields, activation=act, layer_norm_epsilon=float(eps), eos_token_id=eos)
        except ValueError as e:  # structural problems, e.g. n_embd not divisible by n_head
            raise CheckpointError(f"{source}: {e}") from None


def checkpoint_dir(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"CHECKPOINT {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"CHECKPOINT {path} is not a directory (expected a Hugging Face style model directory)")
    return path


def checkpoint_config(path, with_raw=False, weight_files=WEIGHT_FILES):
    """The GPTJConfig of a checkpoint directory, validated without loading any weights (or torch)."""
    path = checkpoint_dir(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing (a Hugging Face model directory needs one)")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    config = GPTJConfig.from_hf_dict(raw, source=str(config_file))
    if not any((path / name).is_file() for name in weight_files):
        raise CheckpointError(f"{path}: no weights found (looked for {', '.join(weight_files)})")
    return (config, raw) if with_raw else config
