"""The FLoRA/FLoRIST paper's MMLU protocol as an lm-evaluation-harness task."""
