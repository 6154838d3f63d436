"""One TFDS dataset builder for every task, writing ``array_record`` files that are read back
with ``tfds.data_source`` (random access, no TensorFlow needed to build or read).

A data set's name holds what it was built from (the source's settings and a fingerprint of the
files it read), so a changed file gives a new build and a missing one an error, never the old
data. Builds of one name take turns under a file lock, so the holder may remove the
``incomplete.*`` folders that a killed build left.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import manual
from xformers_zoo.data.sources import SOURCES, SPLITS, DataSource, effective_length
from xformers_zoo.fs import check_writable_dir
from xformers_zoo.task_specs import TASKS

log = logging.getLogger("xformers_zoo.data")

# Seconds between progress lines while a split is generated (logged at INFO, `-v`).
PROGRESS_EVERY_S = 30.0

# The layout in which this builder stores examples (2: token sequences as raw bytes). It is part
# of every data set's name, so a set written in an older layout is rebuilt, never misread.
STORAGE_FORMAT = 2


class _TaskBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the per-task builders; each subclass is made by ``_builder_class``."""

    SOURCE: DataSource
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, data_config: DataConfig, name: str | None = None, **kwargs):
        self._data_config = data_config
        # split -> (examples, seconds to generate them), filled as a build generates its splits
        self.generated: dict[str, tuple[int, float]] = {}
        name = name or build_name(self.SOURCE, data_config)
        super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

    def __reduce__(self):
        # Loader worker processes receive the data source, and with it this builder; the class
        # is made at run time, so pickle the recipe rather than the class (and the name, so
        # that workers read this build without fingerprinting the files again).
        return (_rebuild, (self.SOURCE.task, self._data_config, self._original_state["data_dir"],
                           self.builder_config.name))

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
        length = effective_length(self._data_config)
        start = last_report = time.perf_counter()
        count = 0
        for key, example in self.SOURCE.examples(split, self._data_config):
            for field in ("inputs", "inputs2"):
                if field in example and len(example[field]) > length:
                    raise ValueError(
                        f"{self.SOURCE.task} {split} example {key} has {len(example[field])} "
                        f"tokens, more than data.max_length={length}; raise data.max_length "
                        f"(the task's LRA length is {TASKS.get(self.SOURCE.task).max_length})")
            yield key, example
            count += 1
            now = time.perf_counter()
            if now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                log.info("%s %s: %d examples in %.0f s", self.SOURCE.task, split, count,
                         now - start)
        self.generated[split] = (count, time.perf_counter() - start)


def build_name(source: DataSource, config: DataConfig) -> str:
    """The name of the data set ``source`` builds for ``config``: its settings, a fingerprint
    of the files it reads (if any) and the storage format."""
    name = source.build_name(config)
    found = source.inputs(config) if source.inputs is not None else None
    if found is not None:
        name += f"_src{manual.fingerprint(*found)}"
    return f"{name}_f{STORAGE_FORMAT}"


@functools.cache
def _builder_class(task: str) -> type[_TaskBuilder]:
    source = SOURCES.get(task)
    # TFDS names a builder after its class; the class name must be the task in CamelCase.
    class_name = "".join(part.capitalize() for part in task.replace("-", "_").split("_"))
    return type(class_name, (_TaskBuilder,), {
        "SOURCE": source, "VERSION": tfds.core.Version(source.version),
        "__module__": __name__, "name": task,
    })


def _rebuild(task: str, data_config: DataConfig, data_dir: str,
             name: str | None = None) -> _TaskBuilder:
    return _builder_class(task)(data_config=data_config, data_dir=data_dir, name=name,
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


@contextlib.contextmanager
def build_lock(builder: _TaskBuilder) -> Iterator[None]:
    """Holds the lock of ``builder``'s data set while it is built, and removes the
    ``incomplete.*`` folders of earlier builds (their builder is gone: it held the lock)."""
    folder = Path(builder.data_dir).parent
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".build.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        for stale in folder.glob("incomplete.*"):
            log.warning("removing %s, left by a build that was stopped", stale)
            shutil.rmtree(stale, ignore_errors=True)
        yield


def prepare(config: DataConfig) -> _TaskBuilder:
    """Builds the data set once (reused afterwards) and returns its builder."""
    builder = dataset_builder(config)
    if builder.is_prepared():
        return builder
    check_writable_dir(config.data_dir, "data.data_dir")
    with build_lock(builder):
        if builder.is_prepared():  # another process built it while this one waited
            return builder
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
