"""Named model shapes. All model sizes used by the pipeline live here."""

from .config import GPTJConfig

PRESETS = {
    # EleutherAI GPT-J-6B
    "gpt-j": GPTJConfig(
        vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
        rotary_dim=64, n_inner=16384, activation="gelu_new",
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
