"""florist-hf: federated LoRA fine-tuning of LLMs with FLoRIST on Hugging Face Trainer and PEFT."""

import logging

__version__ = "0.1.0"

# Three back-ends are imported by the libraries on every run, whether the recipe uses them or not,
# and each would print a line of its own. None is imported by our code outside the runs that ask for
# it; these are the libraries' unconditional imports, so their loggers are quietened by name (their
# errors still show):
# - bitsandbytes: `import peft` imports it whenever it is installed (peft/helpers.py), and on a CPU
#   with AVX512-BF16 its back-end then fetches a 4-bit kernel through `kernels`, warning when it
#   cannot. A recipe's QLoRA checks what it needs itself (`loading.bitsandbytes_config`).
# - kernels: transformers (which requires it since 5.25) imports it in `modeling_utils` through
#   `integrations.hub_kernels`; offline, the fetch above logs a "publisher trust check" warning.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)


def _outside_deepspeed(record: logging.LogRecord) -> bool:
    """DeepSpeed's warnings only where DeepSpeed runs the clients: accelerate imports DeepSpeed, when
    installed, inside every ``save_pretrained`` (``extract_model_from_parallel``), and its import-time
    warnings would otherwise show on every plain run. Its errors always show."""
    from florist_hf.distributed import launched_with_deepspeed

    return record.levelno >= logging.ERROR or launched_with_deepspeed()


# - DeepSpeed: a filter on the logger it creates later (it sets its own level and handler, but keeps
#   filters).
logging.getLogger("DeepSpeed").addFilter(_outside_deepspeed)
