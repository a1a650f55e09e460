"""rlhfkit.data: read, check, template, tokenize, collate and pack training data.

Layouts follow TRL's column names (see `rlhfkit.data.schemas` and docs/data.md).
"""

from rlhfkit.data.chat import (
    PLAIN_CHAT_TEMPLATE,
    apply_chat_template,
    conversation_split,
    has_chat_template,
    render_plain,
    to_prompt_completion,
    to_prompt_text,
    to_ranking_texts,
    to_text_pair,
)
from rlhfkit.data.collate import (
    IGNORE_INDEX,
    Encoded,
    PadCollator,
    encode_prompt,
    encode_prompt_completion,
    tokenize_prompt_completion,
)
from rlhfkit.data.packing import pack_sequences, packed_attention_mask, packing_efficiency
from rlhfkit.data.readers import (
    Records,
    iter_jsonl,
    iter_records,
    load_records,
    read_json,
    read_jsonl,
    read_parquet,
    read_saved_dataset,
)
from rlhfkit.data.schemas import (
    FORMATS,
    VALIDATORS,
    ValidationReport,
    detect_dataset_format,
    detect_format,
    is_conversation,
    is_conversational,
    preference_parts,
    split_implicit_prompt,
    validate_comparisons,
    validate_preferences,
    validate_prompts,
    validate_rankings,
    validate_records,
    validate_sft,
    validate_unpaired,
)
from rlhfkit.errors import DataError

__all__ = [
    "DataError", "FORMATS", "IGNORE_INDEX", "PLAIN_CHAT_TEMPLATE", "VALIDATORS", "Encoded", "PadCollator",
    "Records", "ValidationReport",
    "apply_chat_template", "conversation_split", "detect_dataset_format", "detect_format", "encode_prompt",
    "encode_prompt_completion", "has_chat_template", "is_conversation", "is_conversational", "iter_jsonl",
    "iter_records", "load_records", "pack_sequences", "packed_attention_mask", "packing_efficiency",
    "preference_parts", "read_json", "read_jsonl", "read_parquet", "read_saved_dataset",
    "render_plain", "split_implicit_prompt", "to_prompt_completion", "to_prompt_text", "to_ranking_texts",
    "to_text_pair", "tokenize_prompt_completion", "validate_comparisons", "validate_preferences", "validate_prompts",
    "validate_rankings", "validate_records", "validate_sft", "validate_unpaired",
]
