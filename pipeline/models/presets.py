"""Named model shapes. All model sizes used by the pipeline live here."""

from .config import GPTJConfig

PRESETS = {
    # EleutherAI GPT-J-6B
    "gpt-j": GPTJConfig(
        vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
        rotary_dim=64, n_inner=16384, activation="gelu_new", eos_token_id=50256,
    ),
    # small enough to pretrain from scratch on one GPU in minutes
    "gpt-j-tiny": GPTJConfig(
        vocab_size=4096, n_positions=256, n_embd=256, n_layer=4, n_head=4,
        rotary_dim=32, n_inner=1024, activation="gelu_new",
    ),
    # for tests and CPU smoke runs
    "gpt-j-smoke": GPTJConfig(
        vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4,
        rotary_dim=8, n_inner=256, activation="gelu_new",
    ),
}


def get_preset(name):
    """Return a fresh copy of the named preset config (callers may modify it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace()


def resolve_model(name: str) -> tuple[GPTJConfig, bool]:
    """(architecture, int8) for a model name of the seed or of this project (``pipeline.train
    --model``); ValueError for any other name."""
    base, int8, relu = name, False, False
    if base.endswith("-int8"):
        base, int8 = base[: -len("-int8")], True
    if base.endswith("-relu"):
        base, relu = base[: -len("-relu")], True
    if base == "gpt-j-full":
        config = get_preset("gpt-j")
    elif base == "gpt-j":
        config = get_preset("gpt-j").replace(n_layer=14)  # the seed's distilled student
    else:
        try:
            config = get_preset(base)
        except ValueError:
            raise ValueError(f"--model {name!r} is not a known model; use gpt-j-full[-relu][-int8], "
                             f"gpt-j[-int8], or gpt-j-tiny / gpt-j-smoke with optional -relu / -int8") from None
    return (config.replace(activation="relu") if relu else config), int8
