"""jaxlm's input side: corpora (TFDS), tokenizers, and the grain batch pipeline."""

from jaxlm.data.pipeline import BatchIterator, Prepared, make_iterator, prepare_data

__all__ = ["BatchIterator", "Prepared", "make_iterator", "prepare_data"]
