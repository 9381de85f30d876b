"""A TFDS builder that writes records (dicts of strings) as ArrayRecord, without TensorFlow.

Prepared datasets are ordinary TFDS datasets: `tfds.data_source(...)` or
`tfds.builder_from_directory(dir).as_data_source()` read them with random access, which is what
grain needs for global shuffling and exact resume.

Two ways to fill one:
    build(...)       local: each split is a Python callable yielding records (or (key, record))
    build_beam(...)  the splits are PCollections cut from one Beam pipeline that TFDS runs
                     (`_split_generators(dl_manager, pipeline)`), on DirectRunner locally or on
                     Dataflow/Flink/Spark through `beam_options`; see beam_prepare.py
TFDS orders each split by a hash of the example keys, so the same keys give the same files.
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

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared"
    # to stdout for every build: there is nothing to download here, and prepare's stdout is
    # its JSON summary. Errors still raise as usual.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({f: tfds.features.Text() for f in self._fields})
        return tfds.core.DatasetInfo(builder=self, description=self._description,
                                     features=features)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: records come from the callables
        return {name: self._generate_examples(name) for name in self._splits}

    def _generate_examples(self, split: str):
        for index, record in enumerate(self._splits[split]()):
            yield record if isinstance(record, tuple) else (index, record)


class BeamRecords(Records, skip_registration=True):
    """The same dataset, its splits selected from one shared Beam PCollection.

    `make_examples(pipeline)` builds the whole preparation once and returns a PCollection of
    (split, key, record); every split filters its own. `on_result(result)` receives the
    finished pipeline (for its metrics, i.e. the stage counters).
    """

    name = NAME  # the same folder as the local path: <data_dir>/records/<version>

    def __init__(self, *, fields, split_names, make_examples, on_result, description, **kwargs):
        self._make_examples = make_examples
        self._on_result = on_result
        super().__init__(fields=fields, splits={name: None for name in split_names},
                         description=description, **kwargs)

    def _split_generators(self, dl_manager, pipeline):
        import apache_beam as beam

        del dl_manager
        examples = pipeline | "prepare" >> self._make_examples()
        return {name: (examples
                       | f"select {name}" >> beam.Filter(lambda x, name=name: x[0] == name)
                       | f"key {name}" >> beam.Map(lambda x: (x[1], x[2])))
                for name in self._splits}

    def _process_pipeline_result(self, pipeline_result):
        self._on_result(pipeline_result)


def build(data_dir: str, fields: tuple[str, ...],
          splits: dict[str, Callable[[], Iterable[dict[str, str]]]], description: str) -> str:
    """Writes the dataset under data_dir and returns its folder (<data_dir>/records/<version>)."""
    tfds.disable_progress_bar()
    builder = Records(fields=fields, splits=splits, description=description, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(download_mode=tfds.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return str(builder.data_dir)


def build_beam(data_dir: str, fields: tuple[str, ...], split_names: list[str], make_examples,
               on_result, description: str, beam_options: list[str]) -> str:
    """Writes the dataset with Beam; `beam_options` are pipeline flags ("--runner=...")."""
    from apache_beam.options.pipeline_options import PipelineOptions

    tfds.disable_progress_bar()
    builder = BeamRecords(fields=fields, split_names=split_names, make_examples=make_examples,
                          on_result=on_result, description=description, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.GenerateMode.REUSE_DATASET_IF_EXISTS,
        beam_options=PipelineOptions(beam_options)))
    return str(builder.data_dir)


def data_sources(dataset_dir: str) -> dict:
    """{split name: random-access source} for a folder written by `build` (or any TFDS dir)."""
    return tfds.builder_from_directory(dataset_dir).as_data_source()
