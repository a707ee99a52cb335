"""The FLoRA/FLoRIST paper's MMLU protocol as lm-evaluation-harness tasks (Alpaca prompt, chat template)."""
