"""The curriculum of FlashAttention (Dao et al. 2022, section 4): Path-X trained from a
Pathfinder-64 model with its learned position grid upsampled, Path-256 the same way from it."""

from __future__ import annotations

from collections.abc import Sequence

from xformers_zoo.configs import resolve_config
from xformers_zoo.recipes.base import StageSpec, register_recipe
from xformers_zoo.task_specs import tasks_of_family
from xformers_zoo.train.warm_start import ARCHITECTURE_FIELDS

FIRST = "pathfinder64"
# The model fields every stage takes from the final task; the variant is the command's and the
# positions are fixed to learned_2d.
SHAPE_FIELDS = tuple(f for f in ARCHITECTURE_FIELDS if f not in ("variant", "positional"))


@register_recipe("curriculum", summary="Pathfinder-64, then each larger Pathfinder image up to "
                 "the task, warm-started with the 2-D position grid upsampled",
                 paper="Dao et al. 2022, FlashAttention, section 4")
def curriculum(task: str, variant: str, presets: Sequence[str]) -> list[StageSpec]:
    """Stages for Path-X (``pathfinder64``, ``pathx``) or Path-256 (``pathfinder64``,
    ``pathx``, ``path256``): each trains its task's base config and starts from the previous
    stage's best checkpoint, its ``learned_2d`` position grid repeated to the larger image
    (each position covers a 2x2 block), as FlashAttention reached Path-X and Path-256.

    Learned 2-D positions (``model.positional=learned_2d``) are fixed on every stage: the
    upsampling needs them. The model shape is the final task's: the Pathfinder-64 base config
    has 4 layers x 4 heads, Path-X's and Path-256's 1 layer x 2 heads (the same widths), so
    every stage takes the final task's ``model.num_layers``, ``num_heads``, widths, pooling and
    ``reversible`` (after presets) and Pathfinder-64 is trained at 1 layer x 2 heads;
    ``model.*`` overrides then apply to every stage alike (``model.num_layers=4
    model.num_heads=4`` trains every stage at the Pathfinder-32 shape instead).

    A Path-256 curriculum in the run directory of a Path-X one reuses its two stages when their
    configs match: give that run's final-stage ``train.*`` overrides with a ``pathx:`` prefix.
    """
    sides = {name: spec.image_shape[0] for name, spec in tasks_of_family("pathfinder").items()}
    if task not in sides or sides[task] <= sides[FIRST]:
        larger = [n for n in sides if sides[n] > sides[FIRST]]
        raise ValueError(f"the curriculum recipe trains a Pathfinder task larger than {FIRST} "
                         f"({', '.join(larger)}), starting from {FIRST}; got --task {task}")
    chain = sorted((n for n in sides if sides[FIRST] <= sides[n] <= sides[task]), key=sides.get)
    final = resolve_config(task, variant, presets).model
    shape = {f"model.{field}": getattr(final, field) for field in SHAPE_FIELDS}
    return [StageSpec(name=name, task=name, settings=shape,
                      fixed={"model.positional": "learned_2d"}) for name in chain]
