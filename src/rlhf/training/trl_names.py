"""TRL's names: the flags and YAML keys of TRL's *Config classes and transformers' TrainingArguments, as
:mod:`rlhf.training.options` reads them. Each is one of three kinds:

- :data:`TRL_ALIASES`: it means what one of our fields means, and sets it;
- :data:`TRL_UNSUPPORTED`: it has no meaning here, and says why (what is not implemented, or the flag that
  does it instead), in the one line that refuses it;
- :data:`TRL_NO_OPS`: the values of those settings that ask for nothing we lack (off, none, TRL's default,
  what rlhf always does), which a YAML file may keep (:func:`asks_nothing`).

Only the standard library is imported here (``--help`` builds without torch).
"""

from __future__ import annotations

# Every field also answers to its own name with underscores (--max_new_tokens, max_new_tokens:), so names TRL
# shares with us (--max_length, --beta, --seed, --warmup_ratio, --lora_r, ...) need no entry. An alias counts only
# in a recipe that has its field (--max_completion_length is PPO's and GRPO's --max-new-tokens).
TRL_ALIASES: dict[str, str] = {
    "model_name_or_path": "model",            # TRL ModelConfig
    "sft_model_path": "model",                # TRL PPOConfig
    "reward_model_path": "reward_model",      # TRL PPOConfig
    "dataset_name": "data",                   # TRL ScriptArguments; a hub name becomes hf:NAME
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",  # times the number of processes: ours is global
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "resume_from_checkpoint": "resume",
    "use_peft": "lora",
    "max_seq_length": "max_length",           # TRL SFTConfig before 0.20
    "max_completion_length": "max_new_tokens",
    "response_length": "max_new_tokens",      # TRL PPOConfig
    "precompute_ref_log_probs": "precompute_ref",
    "num_ppo_epochs": "ppo_epochs",
    "num_iterations": "ppo_epochs",           # TRL GRPOConfig (mu)
    "cliprange": "clip_eps",
    "cliprange_value": "clip_eps_value",
    "epsilon": "clip_eps",                    # TRL GRPOConfig
    "epsilon_high": "clip_eps_high",
    "teacher_model_name_or_path": "teacher",  # TRL GKDConfig / DistillationConfig
    "reward_funcs": "reward_fn",              # TRL's GRPO scripts: a list of dotted paths
}

_VLLM = "vLLM is not used here: --rollout-engine picks the sampler (docs/rollout.md)"
_EVAL = "evaluation here is --eval-data every --eval-every steps and at the end, in batches of --batch-size"
_LOGS = "rlhf writes metrics.jsonl and the --report-to trackers itself, and logs from the main process"
_DATA = "batches are built in the training process from the shuffled data (no DataLoader)"
_DDP = "set by accelerate launch --config_file (configs/accelerate/)"
_QUANT = "quantised (QLoRA) training is not implemented: --lora trains adapters on full-precision weights"

# TRL / transformers settings with no meaning here, each with why: refused in one line.
TRL_UNSUPPORTED: dict[str, str] = {
    # transformers' TrainingArguments
    **dict.fromkeys(["push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
                     "hub_always_push", "hub_revision"], "upload the final model yourself (it is an HF-format directory)"),
    "warmup_steps": "use --warmup-ratio",
    "lr_scheduler_kwargs": "the schedules take no arguments here (--lr-scheduler, --warmup-ratio)",
    **dict.fromkeys(["optim_args", "optim_target_modules"], "the optimizer is torch's AdamW (--optim, --lr, --weight-decay)"),
    **dict.fromkeys(["adam_beta1", "adam_beta2", "adam_epsilon"], "AdamW keeps torch's betas (0.9, 0.999) and eps 1e-8"),
    "fp16": "mixed precision is bf16 only (--bf16)",
    **dict.fromkeys(["torch_dtype", "dtype"], "models load in float32 and train in bf16 mixed precision with --bf16"),
    "tf32": "not set here: torch's default matmul precision is kept",
    **dict.fromkeys(["load_in_4bit", "load_in_8bit", "use_bnb_nested_quant", "bnb_4bit_quant_type"], _QUANT),
    **dict.fromkeys(["torch_compile", "torch_compile_backend", "torch_compile_mode"], "torch.compile is not used here"),
    **dict.fromkeys(["use_liger_kernel", "liger_kernel_config"], "Liger kernels are not used here"),
    "gradient_checkpointing_kwargs": "gradient checkpointing takes no arguments here (--gradient-checkpointing)",
    "average_tokens_across_devices": "losses here are always averaged over the tokens of every process",
    "label_smoothing_factor": "not implemented: SFT's loss is plain cross-entropy (DPO has --label-smoothing)",
    "neftune_noise_alpha": "not implemented: NEFTune's embedding noise",
    "torch_empty_cache_steps": "not implemented: the CUDA cache is left to torch",
    "auto_find_batch_size": "not implemented: set --batch-size",
    "use_cache": "the KV cache is used for sampling only, never in a training forward",
    "full_determinism": "not implemented: runs are seeded by --seed, without forcing deterministic kernels",
    "data_seed": "the data order follows --seed",
    "use_cpu": "accelerate picks the device (CUDA_VISIBLE_DEVICES= runs on the CPU)",
    "run_name": "the trackers name the run themselves",
    **dict.fromkeys(["project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id"],
                    "the trackers' project is rlhf, set by --report-to"),
    **dict.fromkeys(["logging_first_step", "log_on_each_node", "logging_nan_inf_filter", "log_level",
                     "log_level_replica", "disable_tqdm", "include_num_input_tokens_seen", "skip_memory_metrics",
                     "debug", "include_tokens_per_second"], _LOGS),
    **dict.fromkeys(["per_device_eval_batch_size", "eval_delay", "prediction_loss_only", "eval_do_concat_batches",
                     "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics",
                     "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "do_eval", "eval_on_start",
                     "do_predict"], _EVAL),
    "do_train": "a run always trains",
    **dict.fromkeys(["eval_strategy", "evaluation_strategy"], "use --eval-every"),
    "save_strategy": "use --save-every",
    "logging_strategy": "use --log-every",
    "logging_dir": "TensorBoard logs go to OUTPUT_DIR/tensorboard",
    **dict.fromkeys(["save_only_model", "save_on_each_node", "enable_jit_checkpoint",
                     "restore_callback_states_from_checkpoint", "ignore_data_skip"],
                    "checkpoints are always whole and resumable, written by the main process (--save-every)"),
    **dict.fromkeys(["load_best_model_at_end", "metric_for_best_model", "greater_is_better"],
                    "the final model is the last step's (--stop-on-overoptimisation keeps the best policy)"),
    **dict.fromkeys(["dataloader_num_workers", "dataloader_drop_last", "dataloader_pin_memory",
                     "dataloader_persistent_workers", "dataloader_prefetch_factor",
                     "dataloader_multiprocessing_context", "dataloader_in_order", "train_sampling_strategy",
                     "length_column_name", "group_by_length", "dataset_num_proc"], _DATA),
    **dict.fromkeys(["deepspeed", "fsdp", "fsdp_config", "accelerator_config", "parallelism_config", "ddp_backend",
                     "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
                     "local_rank"], "use accelerate launch --config_file (configs/accelerate/)"),
    "label_names": "each recipe knows its labels",
    "remove_unused_columns": "every data column is kept (the reward functions get them)",
    # TRL's ScriptArguments, ModelConfig, SFTConfig
    "dataset_train_split": "use --data hf:NAME:SPLIT",
    "dataset_test_split": "use --eval-data hf:NAME:SPLIT",
    "dataset_config": "use --data hf:NAME:SPLIT",
    "dataset_text_field": "the data's columns are read by name (prompt, completion, messages, text)",
    "model_revision": "models load at their main revision: give another one as a local directory to --model",
    "lora_task_type": "each recipe sets it (CAUSAL_LM, or SEQ_CLS for rm)",
    "padding_free": "use --packing (sft) or --share-prompt (dpo, grpo)",
    "loss_type": "it is grpo's and dpo's (ppo's per-token losses are averaged by --loss-agg)",
    # TRL's GRPOConfig
    "model_init_kwargs": "models load with --attn-implementation, --trust-remote-code and --bf16",
    "router_aux_loss_coef": "not implemented: no MoE load-balancing loss is added (0 is accepted)",
    "disable_dropout": "dropout is off in ppo, dpo, grpo and distill, and as the model has it in sft and rm",
    "cast_lm_head_to_fp32": "not implemented: the LM head keeps the model's dtype",
    "num_generations_eval": "nothing is sampled to evaluate here: --eval-data is preference pairs",
    "ds3_gather_for_generation": "DeepSpeed ZeRO-3 generation is not supported here (docs/scaling.md)",
    "shuffle_dataset": "the prompts are always shuffled, seeded by --seed",
    "pad_to_multiple_of": "batches are padded to their longest sequence (or packed, --share-prompt)",
    **dict.fromkeys(["generation_batch_size", "steps_per_generation"],
                    "a step here is one generation: set --rollout-batch-size (prompts) and --mini-batch-size "
                    "(completions an optimizer step)"),
    "min_p": "not implemented: sampling is truncated only by --top-k and --top-p",
    "generation_kwargs": "sampling takes --temperature, --top-k, --top-p and --max-new-tokens only",
    "chat_template_kwargs": "not implemented: prompts are rendered with the chat template's defaults",
    "repetition_penalty": "not implemented: the loss's log-probs score the model's own distribution, which a "
                          "penalty would change",
    "cache_implementation": "--rollout-engine static samples with a static KV cache",
    **dict.fromkeys(["use_vllm", "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode",
                     "vllm_structured_outputs_regex", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
                     "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_max_model_length",
                     "vllm_tensor_parallel_size", "vllm_importance_sampling_correction",
                     "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
                     "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap"], _VLLM),
    **dict.fromkeys(["use_transformers_continuous_batching", "transformers_continuous_batching_config",
                     "use_transformers_paged"], "--rollout-engine picks the sampler (loop, generate, static)"),
    "multi_objective_aggregation": "not implemented: normalize_then_sum (GDPO): the weighted sum of the reward "
                                   "functions is normalised, TRL's default sum_then_normalize",
    **dict.fromkeys(["sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"],
                    "not implemented: TR-DPO's syncing of the reference (it stays frozen)"),
    "top_entropy_quantile": "not implemented: the loss on the highest-entropy tokens only (Wang et al. 2025, "
                            "Beyond the 80/20 rule), 1.0 keeps every token",
    "entropy_coef": "not implemented: no entropy bonus in the GRPO loss (entropy is logged)",
    **dict.fromkeys(["use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
                     "entropy_target"], "not implemented: Skywork-OR1's adaptive entropy control"),
    "max_tool_calling_iterations": "use --env with --max-turns (assistant turns of an episode)",
    "off_policy_mask_threshold": "not implemented: DeepSeek-V3.2's masking of off-policy sequences with "
                                 "negative advantages",
    **dict.fromkeys(["log_completions", "log_multimodal", "log_unique_prompts"],
                    "samples.jsonl is always written (--log-samples), rlhf report shows it"),
    "num_completions_to_print": "use --log-samples (samples.jsonl, shown by rlhf report)",
    "log_completions_hub_repo": "upload OUTPUT_DIR/samples.jsonl yourself",
}

_OFF = (False, None, "false", "none", "no", "")
_ON = (True, "true")
# Values of those settings that ask for nothing we lack (off, none, TRL's default, what rlhf always does): a YAML
# file may keep them, and they are named once on stderr. Any other value is refused as TRL_UNSUPPORTED says.
TRL_NO_OPS: dict[str, tuple] = {
    # off or none
    **dict.fromkeys(["push_to_hub", "hub_private_repo", "hub_always_push", "hub_model_id", "hub_token", "hub_revision",
                     "use_vllm", "fp16", "tf32", "load_in_4bit", "load_in_8bit", "use_bnb_nested_quant", "torch_compile",
                     "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "liger_kernel_config",
                     "do_eval", "eval_on_start", "do_predict", "bf16_full_eval", "fp16_full_eval",
                     "prediction_loss_only", "eval_use_gather_object", "batch_eval_metrics",
                     "eval_accumulation_steps", "use_cpu", "full_determinism", "auto_find_batch_size", "use_cache",
                     "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "logging_first_step",
                     "disable_tqdm", "include_tokens_per_second", "debug", "save_only_model", "save_on_each_node",
                     "enable_jit_checkpoint", "ignore_data_skip", "restore_callback_states_from_checkpoint",
                     "dataloader_drop_last", "dataloader_persistent_workers", "dataloader_prefetch_factor",
                     "dataloader_multiprocessing_context", "group_by_length", "gradient_checkpointing_kwargs",
                     "run_name", "lr_scheduler_kwargs", "optim_args", "optim_target_modules", "neftune_noise_alpha",
                     "torch_empty_cache_steps", "data_seed", "deepspeed", "fsdp", "fsdp_config", "accelerator_config",
                     "parallelism_config", "ddp_backend", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
                     "ddp_broadcast_buffers", "ddp_static_graph", "model_init_kwargs", "cast_lm_head_to_fp32",
                     "num_generations_eval", "pad_to_multiple_of", "generation_batch_size", "steps_per_generation",
                     "min_p", "generation_kwargs", "chat_template_kwargs", "cache_implementation", "sync_ref_model",
                     "use_adaptive_entropy", "max_tool_calling_iterations", "off_policy_mask_threshold",
                     "num_completions_to_print", "log_unique_prompts", "log_completions_hub_repo",
                     "use_transformers_continuous_batching", "transformers_continuous_batching_config",
                     "use_transformers_paged", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
                     "label_names", "include_for_metrics"], (*_OFF, {}, [])),
    **dict.fromkeys(["dataloader_num_workers", "dataset_num_proc", "warmup_steps", "eval_delay",
                     "label_smoothing_factor", "router_aux_loss_coef", "entropy_coef"], (*_OFF, 0)),
    "local_rank": (-1,),  # set by the launcher
    # what rlhf does anyway
    **dict.fromkeys(["average_tokens_across_devices", "shuffle_dataset", "dataloader_pin_memory",
                     "dataloader_in_order", "eval_do_concat_batches", "log_on_each_node", "logging_nan_inf_filter",
                     "skip_memory_metrics", "ds3_gather_for_generation"], _ON),  # the last: ignored without ZeRO-3
    # a column kept, samples.jsonl written; do_train is for a script to read (transformers' Trainer ignores it)
    **dict.fromkeys(["remove_unused_columns", "log_completions", "log_multimodal", "do_train"], _OFF + _ON),
    "model_revision": ("main",),
    **dict.fromkeys(["torch_dtype", "dtype"], (None, "auto", "float32", "none")),
    "save_strategy": ("steps", "no"),   # with save_steps (or none): what --save-every does
    **dict.fromkeys(["eval_strategy", "evaluation_strategy"], ("steps", "no")),
    "logging_strategy": ("steps",),
    "adam_beta1": (0.9,), "adam_beta2": (0.999,), "adam_epsilon": (1e-8,),
    "include_num_input_tokens_seen": ("no", False),
    "log_level": ("passive",), "log_level_replica": ("warning",),
    "train_sampling_strategy": ("random",),
    "repetition_penalty": (1.0,),
    "multi_objective_aggregation": ("sum_then_normalize",),
    "top_entropy_quantile": (1.0,),
}
# Settings TRL reads only when another one is on (vllm_* with use_vllm...): any value is kept while that one
# is off or absent in the same file, as TRL then ignores it too.
TRL_REFINES: dict[str, str] = {
    **{k: "use_vllm" for k in TRL_UNSUPPORTED if k.startswith("vllm_")},
    **dict.fromkeys(["hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push",
                     "hub_revision"], "push_to_hub"),
    **dict.fromkeys(["ref_model_mixup_alpha", "ref_model_sync_steps"], "sync_ref_model"),
    **dict.fromkeys(["entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"],
                    "use_adaptive_entropy"),
    **dict.fromkeys(["bnb_4bit_quant_type", "use_bnb_nested_quant"], "load_in_4bit"),
    "liger_kernel_config": "use_liger_kernel",
    "transformers_continuous_batching_config": "use_transformers_continuous_batching",
    **dict.fromkeys(["metric_for_best_model", "greater_is_better"], "load_best_model_at_end"),
    "length_column_name": "group_by_length",
    **dict.fromkeys(["per_device_eval_batch_size", "eval_delay", "eval_accumulation_steps", "eval_do_concat_batches",
                     "batch_eval_metrics", "eval_use_gather_object", "prediction_loss_only", "include_for_metrics",
                     "bf16_full_eval", "fp16_full_eval", "num_generations_eval"], "eval_strategy"),
    **dict.fromkeys(["num_completions_to_print", "log_unique_prompts", "log_multimodal", "log_completions_hub_repo"],
                    "log_completions"),
}
DROPOUT_OFF = ("ppo", "dpo", "grpo", "distill")  # the recipes that turn dropout off (TRL's disable_dropout: true)


def _same(value, v) -> bool:
    """YAML's ``value`` is the accepted ``v``: bools and None by identity, strings case-blind, numbers by value
    (PyYAML reads ``1e-8`` as a string)."""
    if isinstance(v, bool) or v is None:
        return value is v
    if isinstance(v, str):
        return not isinstance(value, (dict, list)) and str(value).lower() == v
    if isinstance(v, (int, float)):
        try:
            return not isinstance(value, (bool, dict, list)) and value is not None and float(value) == v
        except ValueError:
            return False
    return value == v


def _is(value, accepted: tuple) -> bool:
    return any(_same(value, v) for v in accepted)


def asks_nothing(key: str, value, settings: dict, recipe: str) -> bool:
    """Whether TRL setting ``key: value`` of a YAML file (whose other keys are ``settings``) asks for nothing
    rlhf ``recipe`` lacks: a value of :data:`TRL_NO_OPS`, or a setting whose parent (:data:`TRL_REFINES`) is
    off there, which TRL ignores too."""
    if key == "disable_dropout":
        return recipe in DROPOUT_OFF and _is(value, _ON)
    parent = TRL_REFINES.get(key)
    if parent is not None and _is(settings.get(parent), _OFF):
        return True
    return _is(value, TRL_NO_OPS.get(key, ()))
