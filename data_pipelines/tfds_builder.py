"""A TFDS builder that writes records (dicts of strings) as ArrayRecord, without TensorFlow.

Prepared datasets are ordinary TFDS datasets: `tfds.data_source(...)` or
`tfds.builder_from_directory(dir).as_data_source()` read them with random access, which is what
grain needs for global shuffling and exact resume.
"""

from typing import Callable, Iterable

import tensorflow_datasets as tfds

NAME = "records"  # TFDS folder name: <data_dir>/records/<version>
VERSION = "1.0.0"


class Records(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Each split is a callable returning an iterable of {field: str} records."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, fields: tuple[str, ...],
                 splits: dict[str, Callable[[], Iterable[dict[str, str]]]], description: str,
                 **kwargs):
        self._fields = tuple(fields)
        self._splits = splits
        self._description = description
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({f: tfds.features.Text() for f in self._fields})
        return tfds.core.DatasetInfo(builder=self, description=self._description,
                                     features=features)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: records come from the callables
        return {name: self._generate_examples(name) for name in self._splits}

    def _generate_examples(self, split: str):
        for index, record in enumerate(self._splits[split]()):
            yield index, record


def build(data_dir: str, fields: tuple[str, ...],
          splits: dict[str, Callable[[], Iterable[dict[str, str]]]], description: str) -> str:
    """Writes the dataset under data_dir and returns its folder (<data_dir>/records/<version>)."""
    tfds.disable_progress_bar()
    builder = Records(fields=fields, splits=splits, description=description, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(download_mode=tfds.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return str(builder.data_dir)


def data_sources(dataset_dir: str) -> dict:
    """{split name: random-access source} for a folder written by `build` (or any TFDS dir)."""
    return tfds.builder_from_directory(dataset_dir).as_data_source()
