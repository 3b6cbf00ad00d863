"""Data: readers, TRL-compatible formats, chat templates, strict validation and batching."""

from rlhf.data.collate import (
    collate_packed, collate_preference, collate_preference_shared, collate_prompts, collate_sft, pack_shared_prefixes,
    pad,
)
from rlhf.data.encode import PLAIN_CHAT_TEMPLATE, Encoder, Prepared, format_errors, prepare
from rlhf.data.formats import KINDS, normalize, split_hh_transcripts
from rlhf.data.readers import DataError, Record, RecordError, read_records

__all__ = [
    "KINDS", "PLAIN_CHAT_TEMPLATE", "DataError", "Encoder", "Prepared", "Record", "RecordError",
    "collate_packed", "collate_preference", "collate_preference_shared", "collate_prompts", "collate_sft", "format_errors",
    "normalize", "pack_shared_prefixes", "pad", "prepare", "read_records", "split_hh_transcripts",
]
