"""Every setting of the quality benchmark in one place (sizes chosen for about 30 minutes on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: The paper's exact 8-client Dolly split, beside the clone (SPEC §6); used here only as "all of Dolly".
SHARED_DOLLY = REPO.parent / "shared" / "data" / "dolly" / "8"
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
#: FLoRIST-E's tolerance in this benchmark (held-out loss, nats): the τ grid's losses differ by a
#: few thousandths, so the CLI's default 0.01 would always pick the lowest τ.
SWEEP_TOLERANCE = 0.002
