"""florist-hf: federated LoRA fine-tuning of LLMs with FLoRIST on Hugging Face Trainer and PEFT."""

import logging

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed, and bitsandbytes' CPU backend then warns, at
# import, that an optional kernel package is missing: a line on every run, also for the runs that
# never asked for 4-bit. Its errors still show; a recipe's QLoRA checks what it needs itself
# (`loading.bitsandbytes_config`).
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
