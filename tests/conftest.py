import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A saved tiny Llama (random weights) + byte tokenizer, built once per test session."""
    from florist_hf.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture
def shared_data() -> Path:
    """The real Dolly split and MMLU subset beside the clone; skipped in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (only present beside the CI clone)")
    return SHARED_DATA
