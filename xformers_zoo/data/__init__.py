"""The data layer: per-task sources, one TFDS builder writing array_record, grain pipelines.
Importing this package imports every module in it, so that each source (``@register_source``
in its task's module) is known."""

from xformers_zoo.data.builder import data_source, dataset_builder, prepare
from xformers_zoo.data.pipeline import eval_batches, train_dataset
from xformers_zoo.data.sources import SOURCES, DataSource, register_source
from xformers_zoo.registry import import_submodules

import_submodules(__name__)

__all__ = ["SOURCES", "DataSource", "data_source", "dataset_builder", "eval_batches",
           "prepare", "register_source", "train_dataset"]
