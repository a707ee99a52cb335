"""The trainers a client can train with, by the name a recipe gives (``client.trainer``). Adding one is
a file under ``florist_hf/clients/`` (a `kind.TrainerKind`) and a line here."""

from __future__ import annotations

from florist_hf.clients import dpo, sft, trainer
from florist_hf.clients.kind import TrainerKind
from florist_hf.errors import FloristError

TRAINERS: dict[str, TrainerKind] = {
    "trainer": trainer.KIND,
    "sft": sft.KIND,
    "dpo": dpo.KIND,
}


def trainer_kind(name: str) -> TrainerKind:
    """The registered trainer ``name``; one line naming the others for a name that is not."""
    if name not in TRAINERS:
        raise FloristError(f"client.trainer: unknown trainer {name!r}; use one of {', '.join(TRAINERS)}")
    return TRAINERS[name]
