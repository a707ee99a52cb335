"""florist-hf: federated LoRA fine-tuning of LLMs with FLoRIST on Hugging Face Trainer and PEFT."""

import logging

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed, and bitsandbytes' CPU backend then warns, at
# import, that an optional kernel package is missing: a line on every run, also for the runs that
# never asked for 4-bit. Its errors still show; a recipe's QLoRA checks what it needs itself
# (`loading.bitsandbytes_config`).
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# bitsandbytes then looks for its CPU kernel with the kernels package, which warns on every offline
# run that it cannot check the kernel's publisher; its errors still show.
logging.getLogger("kernels").setLevel(logging.ERROR)


def _outside_deepspeed(record: logging.LogRecord) -> bool:
    """DeepSpeed's "Setting accelerator to CPU" warning only where DeepSpeed runs the clients:
    accelerate imports DeepSpeed, when installed, inside every ``save_pretrained``, and the warning
    would otherwise show on every plain run."""
    from florist_hf.distributed import launched_with_deepspeed

    return launched_with_deepspeed() or not str(record.msg).startswith("Setting accelerator to CPU")


# A filter on the logger DeepSpeed creates later (it sets its own level, but keeps filters).
logging.getLogger("DeepSpeed").addFilter(_outside_deepspeed)
