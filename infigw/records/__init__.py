"""Teachers offline: capture, store, read and align the teachers' top-k outputs (see docs/records.md).

- :func:`open` a store (``len``, ``store[i]`` -> :class:`Example`), :func:`collate` examples into a padded
  :class:`~infigw.TopKRecord` with masks (:class:`RecordBatch`);
- :class:`StoreWriter` appends examples (crash-safe, several ranks at once), :func:`merge_index` merges their
  manifests; ``python -m infigw.records capture ...`` fills a store from a ``transformers`` model;
- :func:`import_distillkit` / :func:`import_vllm` convert DistillKit Parquet and vLLM ``prompt_logprobs``;
- :func:`token_offsets`, :func:`offset_pairs`, :func:`offset_match`, :func:`response_mask` pair student and
  teacher positions through the characters of their target tokens.
"""
from ..alignment import offset_match, offset_pairs, response_mask
from .collate import RecordBatch, collate
from .importers import import_distillkit, import_vllm
from .manifest import RecordStoreError, merge_index
from .store import (Example, RecordStore, StoreMetadata, StoreWriter, TokenizerMismatchError, open_store,
                    tokenizer_identity)
from .text import token_offsets, trim_leading_whitespace

open = open_store  # noqa: A001  (infigw.records.open(STORE), like a dataset library's open)

__all__ = ["open", "open_store", "RecordStore", "Example", "StoreMetadata", "StoreWriter", "merge_index",
           "RecordStoreError", "TokenizerMismatchError", "tokenizer_identity", "collate", "RecordBatch",
           "import_distillkit", "import_vllm", "token_offsets", "trim_leading_whitespace", "offset_match",
           "offset_pairs", "response_mask"]
