"""The data layer: per-task sources, one TFDS builder writing array_record, grain pipelines."""

# Importing each task's module registers its source.
from xformers_zoo.data import image, listops, pathfinder_source, retrieval, text  # noqa: F401
from xformers_zoo.data.builder import data_source, dataset_builder, prepare
from xformers_zoo.data.pipeline import eval_batches, train_dataset
from xformers_zoo.data.sources import SOURCES, DataSource

__all__ = ["SOURCES", "DataSource", "data_source", "dataset_builder", "eval_batches",
           "prepare", "train_dataset"]
