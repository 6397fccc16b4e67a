import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread per test worker is fastest

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

TINY_ARCH = {
    "llama": ("causal", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)),
    "llada": ("llada", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)),
    "dream": ("dream", dict(hidden_size=112, intermediate_size=296, num_hidden_layers=2, num_attention_heads=7,
                            num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)),
}


@pytest.fixture(scope="session")
def tokenizer():
    from freeact.models.loading import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture
def tiny_model(tokenizer):
    """Factory: tiny_model('llama'|'llada'|'dream', dtype=torch.float32) -> model in eval mode."""
    from freeact.models.loading import build_tiny

    def make(kind: str, dtype=torch.float32, seed=0):
        family, arch = TINY_ARCH[kind]
        return build_tiny(family, arch, tokenizer, seed=seed).to(dtype).eval()

    return make


def compose_cfg(overrides=()):
    from hydra import compose, initialize_config_dir

    import freeact.config  # noqa: F401  (schemas)

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def compose():
    """compose(["model=tiny_dream", ...]) -> the real Hydra config with overrides."""
    return compose_cfg
