"""Models: any HF causal LM, the value head or separate critic, reward model, reference, LoRA."""

from rlhf.models.heads import (
    Critic, PolicyAndCritic, PolicyWithValueHead, gather_at, gather_last, get_score_stats, member_scores,
    position_ids_from_mask, score_index, sequence_scores, set_score_stats, token_scores,
)
from rlhf.models.lm_head import causal_hidden, lm_head
from rlhf.models.loading import (
    ENSEMBLE_FILE, ModelLoadError, ensemble_members, freeze, frozen_copy, is_ensemble, load_causal_lm,
    load_reward_models, load_sequence_classifier, load_tokenizer, read_ensemble, resolve_dtype,
)
from rlhf.models.lora import (
    Reference, apply_lora, causal_logits, disable_dropout, eval_mode, is_peft_model, merge_lora, set_gradient_checkpointing,
)
from rlhf.models.packing import check_packing, default_tolerance, packed_logits, packing_support, shared_prefix_mask
from rlhf.models.saving import save_pretrained
from rlhf.models.tiny import CHAT_TEMPLATE, tiny_causal_lm, tiny_config, train_tokenizer
from rlhf.models.wrappers import unwrap

__all__ = [
    "CHAT_TEMPLATE", "Critic", "ENSEMBLE_FILE", "ModelLoadError", "PolicyAndCritic", "PolicyWithValueHead", "Reference",
    "apply_lora",
    "causal_hidden", "causal_logits", "lm_head", "check_packing", "default_tolerance", "disable_dropout", "ensemble_members", "eval_mode",
    "freeze", "frozen_copy", "gather_at", "gather_last", "get_score_stats", "is_ensemble", "is_peft_model",
    "load_causal_lm", "load_reward_models", "load_sequence_classifier", "load_tokenizer", "member_scores",
    "merge_lora", "packed_logits", "packing_support", "position_ids_from_mask", "read_ensemble", "resolve_dtype",
    "save_pretrained", "score_index", "sequence_scores", "set_gradient_checkpointing", "set_score_stats",
    "shared_prefix_mask", "tiny_causal_lm", "tiny_config", "token_scores", "train_tokenizer", "unwrap",
]
