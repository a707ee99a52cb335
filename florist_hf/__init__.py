"""florist-hf: federated LoRA fine-tuning of LLMs with FLoRIST on Hugging Face Trainer and PEFT."""

__version__ = "0.1.0"
