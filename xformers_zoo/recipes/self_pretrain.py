"""Self-pretraining (Amos et al. 2024, "Never Train from Scratch: Fair Comparison of
Long-Sequence Models Requires Data-Driven Priors"): masked-token denoising on the task's own
training inputs, then the classifier fine-tuned from it."""

from __future__ import annotations

from collections.abc import Sequence

from xformers_zoo.recipes.base import StageSpec, register_recipe
from xformers_zoo.task_specs import TASKS

MASKING_FIELDS = ("train.mask_rate", "train.mask_span")


@register_recipe("self-pretrain", summary="masked-token denoising on the task's own training "
                 "inputs, then the classifier fine-tuned from it",
                 paper="Amos et al. 2024, Never Train from Scratch")
def self_pretrain(task: str, variant: str, presets: Sequence[str]) -> list[StageSpec]:
    """Two stages on ``task``'s base config: ``pretrain`` (``train.objective=masked``: spans of
    the real tokens hidden behind a mask token and predicted, ``train.mask_rate`` and
    ``train.mask_span`` going to this stage without a prefix) and ``finetune``
    (``train.objective=classify``) starting from its best checkpoint: the encoder and
    embeddings are copied, the mask-token row and the masked head dropped, the classifier head
    starts fresh. Both stages take the task's training budget; ``pretrain:train.steps=N`` sets
    the pretraining's. Two-input tasks (Retrieval) are refused: masked pretraining does not
    support them yet."""
    del variant, presets
    if TASKS.get(task).two_inputs:
        accepted = [n for n, spec in TASKS.items() if not spec.two_inputs]
        raise ValueError(f"the self-pretrain recipe needs train.objective=masked, which the "
                         f"two-input task {task} does not support; tasks it serves: "
                         f"{', '.join(accepted)}")
    return [StageSpec(name="pretrain", task=task, fixed={"train.objective": "masked"},
                      claims=MASKING_FIELDS),
            StageSpec(name="finetune", task=task, fixed={"train.objective": "classify"})]
