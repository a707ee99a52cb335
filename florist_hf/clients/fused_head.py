"""TRL's fused LM head on a CPU at the cost of the full logits it replaces: the trained positions alone,
in vocabulary tiles that stay in the cache; the same log-probabilities, loss, gradients and metrics.

TRL's SFTTrainer and DPOTrainer compute their loss through a fused LM head
(``trl.trainer.utils.add_fused_lm_head``) that folds the logits tile by tile into each label's
log-probability, the entropy and the top-1 hits. Where its Triton kernels run (CUDA, XPU) it scores the
positions whose label is not -100 alone; on every other device it scores all positions (so that a compiler
such as Neuron's sees one shape) and folds tiles 32,768 words wide with torch operations. On a CPU that
made the head and loss of a SmolLM2-135M step (batch 4 × 256, bf16 autocast, one thread) 3.3× the
Trainer's own full-logits cross-entropy, and an SFT client's loss and backward 18 % slower than a Trainer
client's on the same batches; tuned, 10 % faster (benchmarks/README.md, "Keeping the lead over flowertune-llm").

`tune_fused_lm_head_for_cpu` replaces two names of TRL 1.16's ``trl.trainer.utils`` once per process,
for CPU tensors alone (other devices keep TRL's path):

- ``_use_triton``, which there decides one thing, whether the head scores the labelled positions alone
  (TRL's ``compact``): on a CPU it now does, as on a GPU (eager CPU code has no compiler to recompile);
  a prompt masked out of the loss (``completion_only_loss``, DPO's prompts) is then not scored at all.
- ``_ChunkedLogProbFunction``, called with TRL's tile width: on a CPU the width is `CPU_VOCAB_TILE`, so
  that a tile of a batch's positions stays near the cache rather than streaming 134 MB (4 × 256 × 32,768
  fp32) through memory for each of the fold's dozen elementwise passes.

Each labelled position's log-probability, entropy and top-1 hit is computed by the same function from
the same row of hidden states, only its tile's sums are taken in another order, so what is trained moves
by float round-off alone (tests/test_fused_head.py). Where the installed TRL's head is not the one these
names were read from, nothing is replaced (TRL's own path, slower on a CPU).
"""

from __future__ import annotations

import functools

#: Vocabulary words per tile of the fused head on a CPU (TRL's is 32,768): 2,048 and 4,096 measured fastest,
#: 8,192 23 % slower, 32,768 2.4× (SmolLM2's head and loss on 545 labelled positions, one thread).
CPU_VOCAB_TILE = 4096

#: The lines of ``add_fused_lm_head`` that the two replaced names take part in (TRL 1.16): where its
#: source lacks one, the head is another version's and is left alone.
_HEAD_LINES = ("compact = _use_triton(hidden_states.device)", "per_token = _ChunkedLogProbFunction.apply(")


class ScoresLabelledPositionsOnCpu:
    """``trl.trainer.utils._use_triton`` as the fused head asks it (score the labelled positions alone?):
    yes on a CPU, TRL's answer elsewhere (``trl_answer``)."""

    def __init__(self, trl_answer):
        self.trl_answer = trl_answer

    def __call__(self, device) -> bool:
        return device.type == "cpu" or self.trl_answer(device)


class CpuVocabularyTiles:
    """``trl.trainer.utils._ChunkedLogProbFunction`` (``function``, TRL's autograd function) with tiles
    `CPU_VOCAB_TILE` words wide on a CPU."""

    def __init__(self, function):
        self.function = function

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, *rest):
        if hidden.device.type == "cpu":
            chunk_size = min(chunk_size, CPU_VOCAB_TILE)
        return self.function.apply(hidden, weight, bias, targets, temperature, chunk_size, *rest)


@functools.cache
def tune_fused_lm_head_for_cpu() -> bool:
    """Make TRL's fused LM head score the labelled positions alone, in `CPU_VOCAB_TILE`-wide tiles, on CPU
    tensors (once per process; a head built before or after alike). False, with nothing replaced, where the
    installed TRL's head is not the one this was written for."""
    import inspect

    from trl.trainer import utils as trl_utils

    try:
        source = inspect.getsource(trl_utils.add_fused_lm_head)
    except (AttributeError, OSError, TypeError):
        return False
    if not all(line in source for line in _HEAD_LINES) or not all(
            hasattr(trl_utils, name) for name in ("_use_triton", "_ChunkedLogProbFunction")):
        return False
    trl_utils._use_triton = ScoresLabelledPositionsOnCpu(trl_utils._use_triton)
    trl_utils._ChunkedLogProbFunction = CpuVocabularyTiles(trl_utils._ChunkedLogProbFunction)
    return True
