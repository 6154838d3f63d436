"""Attention variants (one module each, registered by import) and the shared classifier."""

from xformers_zoo.models import flash  # noqa: F401  (registers "flash")
from xformers_zoo.models import full  # noqa: F401  (registers "full")
from xformers_zoo.models import linear  # noqa: F401  (registers "linear")
from xformers_zoo.models import linformer  # noqa: F401  (registers "linformer")
from xformers_zoo.models import nystromformer  # noqa: F401  (registers "nystromformer")
from xformers_zoo.models import performer  # noqa: F401  (registers "performer")
from xformers_zoo.models import reformer  # noqa: F401  (registers "reformer")
from xformers_zoo.models import sinkhorn  # noqa: F401  (registers "sinkhorn")
from xformers_zoo.models import synthesizer  # noqa: F401  (registers "synthesizer-*")
from xformers_zoo.models.classifier import Classifier

__all__ = ["Classifier"]
