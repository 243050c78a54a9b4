"""Rows -> tokenized samples with a loss mask -> (sharded, shuffled, packed) batches."""
from .batches import IGNORE, Packed, collate, collate_packed, fit_length, pack, shard_indices
from .rows import DataError, Row, RowStream, read_rows
from .tokenization import Sample, chat_ids, tokenize_row

__all__ = ["IGNORE", "DataError", "Packed", "Row", "Sample", "chat_ids", "collate", "collate_packed",
           "RowStream", "fit_length", "pack", "read_rows", "shard_indices", "tokenize_row"]
