"""One TFDS dataset builder for every task, writing ``array_record`` files that are read back
with ``tfds.data_source`` (random access, no TensorFlow needed to build or read)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data.sources import SOURCES, SPLITS, DataSource
from xformers_zoo.tasks import TASKS

log = logging.getLogger("xformers_zoo.data")

# The layout in which this builder stores examples (2: token sequences as raw bytes). It is part
# of every data set's name, so a set written in an older layout is rebuilt, never misread.
STORAGE_FORMAT = 2


class _TaskBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the per-task builders; each subclass is made by ``_builder_class``."""

    SOURCE: DataSource
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, data_config: DataConfig, **kwargs):
        self._data_config = data_config
        name = f"{self.SOURCE.build_name(data_config)}_f{STORAGE_FORMAT}"
        super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

    def __reduce__(self):
        # Loader worker processes receive the data source, and with it this builder; the class
        # is made at run time, so pickle the recipe rather than the class.
        return (_rebuild, (self.SOURCE.task, self._data_config, self._original_state["data_dir"]))

    def _info(self) -> tfds.core.DatasetInfo:
        task = TASKS.get(self.SOURCE.task)
        # Raw bytes: the default stores one int64 per token, which made writing and reading
        # 64K-token Path-256 images 30x and 6x slower.
        sequence = tfds.features.Tensor(shape=(None,), dtype=self.SOURCE.token_dtype,
                                        encoding=tfds.features.Encoding.BYTES)
        features = {"inputs": sequence, "label": tfds.features.ClassLabel(
            num_classes=task.num_classes)}
        if task.two_inputs:
            features["inputs2"] = sequence
        return tfds.core.DatasetInfo(builder=self, description=self.SOURCE.description,
                                     features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager  # sources read their own files (manual_dir) or generate
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        return self.SOURCE.examples(split, self._data_config)


@functools.cache
def _builder_class(task: str) -> type[_TaskBuilder]:
    source = SOURCES.get(task)
    # TFDS names a builder after its class; the class name must be the task in CamelCase.
    class_name = "".join(part.capitalize() for part in task.replace("-", "_").split("_"))
    return type(class_name, (_TaskBuilder,), {
        "SOURCE": source, "VERSION": tfds.core.Version(source.version),
        "__module__": __name__, "name": task,
    })


def _rebuild(task: str, data_config: DataConfig, data_dir: str) -> _TaskBuilder:
    return _builder_class(task)(data_config=data_config, data_dir=data_dir,
                                file_format="array_record")


def dataset_builder(config: DataConfig) -> _TaskBuilder:
    """The TFDS builder of ``config.task`` for these data settings."""
    return _rebuild(config.task, config, str(Path(config.data_dir)))


@contextlib.contextmanager
def shuffle_in_memory() -> Iterator[None]:
    """Keeps TFDS's shuffle of each split in memory while a data set is built, when TensorFlow
    is not installed.

    TFDS shuffles a split in memory up to 1 GB of serialized examples and beyond that through
    temporary bucket files that it writes with TensorFlow's file API, so without TensorFlow a
    larger split fails (Path-X's 160K training images are 2.6 GB). In memory, the largest
    split must fit in RAM instead: 2.6 GB for Path-X, 10.5 GB for Path-256.
    """
    if importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    limit = tfds_shuffle.MAX_MEM_BUFFER_SIZE
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = 1 << 62
    try:
        yield
    finally:
        tfds_shuffle.MAX_MEM_BUFFER_SIZE = limit


def prepare(config: DataConfig) -> _TaskBuilder:
    """Builds the data set once (reused afterwards) and returns its builder."""
    builder = dataset_builder(config)
    if not builder.is_prepared():
        log.info("preparing %s/%s in %s", config.task, builder.builder_config.name,
                 builder.data_dir)
        scope = builder.SOURCE.build_scope
        # TFDS writes the splits one after another; the scope spans all of them.
        with (shuffle_in_memory(),
              scope(config) if scope is not None else contextlib.nullcontext()):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=config.manual_dir))
    return builder


def data_source(config: DataConfig, split: str):
    """Random-access source of one split (preparing the data set first if needed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return prepare(config).as_data_source(split=split)
