"""MMLU by log-likelihood (lm-eval's ``mmlu`` prompt and scoring) on the 1,444-question subset."""
