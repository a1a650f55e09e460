"""TRL and transformers option names that users bring in their YAML files and flags.

Three kinds: names accepted as they are, renamed to rlhfkit's field (the meaning is the same);
names with an rlhfkit equivalent of another name or shape, answered with that equivalent in one
line; and names rlhfkit has no counterpart for, said to be so. Anything else is a typo, answered
with the closest field names. The lists follow transformers 5's TrainingArguments and TRL 1.x's
SFT/DPO/Reward/GRPO/RLOO/KTO/ORPO/PPO configs, ModelConfig and ScriptArguments, plus a few
names of earlier releases (evaluation_strategy, max_seq_length, PPO's response_length).
"""

from __future__ import annotations

import difflib

from rlhfkit.errors import ConfigError

# TRL name -> rlhfkit field of the same meaning; applied where the config has that field
ALIASES = {
    "model_name_or_path": "model", "sft_model_path": "model", "reward_model_path": "reward_model",
    "dataset_name": "dataset", "dataset_train_split": "dataset_split", "dataset_test_split": "eval_split",
    "use_peft": "use_lora", "torch_dtype": "dtype", "center_rewards_coefficient": "center_rewards_coef",
    "precompute_ref_log_probs": "precompute_ref",
}

# TRL name -> (the rlhfkit field it needs, what to write instead), said where the config has that field
EQUIVALENTS = {
    "use_vllm": ("engine", "--engine vllm"),
    "vllm_mode": ("engine", "--engine vllm (vLLM runs colocated in the training process; no server mode)"),
    "num_iterations": ("num_ppo_epochs", "--num_ppo_epochs"),
    "steps_per_generation": ("num_mini_batches", "--num_mini_batches (optimiser steps per rollout batch)"),
    "dataset_name": ("prompts", "--prompts"),
    "num_generations": ("prompts_per_step", "--prompts_per_step (PPO samples one response per prompt)"),
    "kl_coef": ("beta", "--beta"),
    "beta": ("kl_coef", "--kl_coef"),
    "cliprange": ("epsilon", "--epsilon"),
    "epsilon": ("cliprange", "--cliprange"),
    "loss_type": ("loss", "--loss"),
    "max_seq_length": ("max_length", "--max_length"),
    "response_length": ("max_completion_length", "--max_completion_length"),
    "max_new_tokens": ("max_completion_length", "--max_completion_length"),
    "total_episodes": ("max_steps", "--max_steps (updates of --prompts_per_step prompts each)"),
    "local_rollout_forward_batch_size": ("generation_batch_size", "--generation_batch_size"),
    "num_sample_generations": ("sample_every", "--sample_every N (a table of samples every N updates)"),
    "log_completions": ("sample_every", "--sample_every N (a table of samples every N updates)"),
    "num_completions_to_print": ("sample_every", "--sample_every N (a table of samples every N updates)"),
    "whiten_rewards": ("score_norm", "--score_norm batch"),
    "mask_truncated_completions": ("missing_eos_penalty", "--missing_eos_penalty X (truncated responses are penalised)"),
    "eval_strategy": ("eval_steps", "--eval_steps N"),
    "evaluation_strategy": ("eval_steps", "--eval_steps N"),
    "save_strategy": ("save_steps", "--save_steps N"),
    "resume_from_checkpoint": ("resume", "--resume true (the newest checkpoint in output_dir)"),
    "warmup_ratio": ("warmup_steps", "--warmup_steps N"),
    "logging_dir": ("output_dir", "--output_dir (metrics and TensorBoard events are written there)"),
    "model_init_kwargs": ("dtype", "--dtype and --attn_implementation"),
    "lora_task_type": ("use_lora", "--use_lora true (the task type follows the recipe)"),
    "vllm_importance_sampling_correction": ("off_policy_correction", "--off_policy_correction tis (any engine)"),
    "vllm_importance_sampling_mode": ("off_policy_level", "--off_policy_correction tis|mis --off_policy_level token|sequence"),
    "vllm_importance_sampling_cap": ("off_policy_cap", "--off_policy_cap"),
}

# names of transformers/TRL options rlhfkit does not have
UNSUPPORTED = frozenset("""
accelerator_config activation_checkpointing activation_checkpointing_kwargs activation_offloading
assistant_only_loss auto_find_batch_size average_tokens_across_devices batch_eval_metrics bf16_full_eval
bnb_4bit_quant_storage bnb_4bit_quant_type cache_implementation cast_lm_head_to_fp32 chat_template_kwargs
chat_template_path data_seed dataloader_drop_last dataloader_in_order dataloader_multiprocessing_context
dataloader_num_workers dataloader_persistent_workers dataloader_pin_memory dataloader_prefetch_factor
dataset_config dataset_kwargs dataset_num_proc dataset_streaming dataset_text_field ddp_backend
ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout debug
deepspeed delta disable_tqdm discopop_tau do_eval do_predict do_train ds3_gather_for_generation
enable_jit_checkpoint entropy_coef_delta entropy_coef_max entropy_coef_min entropy_target eos_token
eval_accumulation_steps eval_delay eval_do_concat_batches eval_on_start eval_packing eval_use_gather_object
exp_name f_alpha_divergence_coef f_divergence_type force_use_ref_model fp16_full_eval fsdp fsdp_config
full_determinism generate_during_eval generation_kwargs gradient_checkpointing_kwargs greater_is_better
hub_always_push hub_model_id hub_private_repo hub_revision hub_strategy hub_token ignore_bias_buffers
ignore_data_skip include_for_metrics include_num_input_tokens_seen is_encoder_decoder label_names
label_smoothing_factor ld_alpha length_column_name liger_kernel_config load_best_model_at_end load_in_4bit
load_in_8bit local_rank log_completions_hub_repo log_level log_level_replica log_multimodal log_on_each_node
log_unique_prompts logging_first_step logging_nan_inf_filter logging_strategy lora_modules_to_save
lora_target_parameters loss_weights lr_scheduler_kwargs max_tool_calling_iterations metric_for_best_model
min_p model_adapter_name model_revision multi_objective_aggregation neftune_noise_alpha normalize_advantages
num_generations_eval off_policy_mask_threshold optim_args optim_target_modules packing_strategy
pad_to_multiple_of pad_token padding_free padding_value parallelism_config per_device_eval_batch_size
precompute_ref_batch_size prediction_loss_only project push_to_hub ref_adapter_name ref_model_init_kwargs
ref_model_mixup_alpha ref_model_sync_steps remove_unused_columns repetition_penalty
restore_callback_states_from_checkpoint reward_clip_range router_aux_loss_coef rpo_alpha run_name
sapo_temperature_neg sapo_temperature_pos save_on_each_node save_only_model save_total_limit shuffle_dataset
skip_memory_metrics stop_token stop_token_id sync_ref_model tf32 tools top_entropy_quantile
torch_compile torch_compile_backend torch_compile_mode torch_empty_cache_steps trackio_bucket_id
trackio_space_id trackio_static_space_id train_sampling_strategy transformers_continuous_batching_config
truncation_mode trust_remote_code use_adaptive_entropy use_bias_correction_kl use_bnb_nested_quant use_cache
use_cpu use_dora use_liger_kernel use_logits_to_keep use_rslora use_transformers_continuous_batching
use_transformers_paged use_weighting vespo_k_neg vespo_k_pos vespo_lambda_neg vespo_lambda_pos
vllm_enable_sleep_mode vllm_gpu_memory_utilization vllm_group_port vllm_importance_sampling_cap
vllm_importance_sampling_clip_max vllm_importance_sampling_clip_min vllm_importance_sampling_correction
vllm_importance_sampling_mode vllm_max_model_length vllm_model_impl vllm_server_base_url vllm_server_host
vllm_server_port vllm_server_timeout vllm_structured_outputs_regex vllm_tensor_parallel_size
generation_batch_size num_mini_batches num_ppo_epochs kl_estimator
""".split())

# rlhfkit's own earlier names -> the transformers/TRL names it follows now
RENAMED = {"per_device_batch_size": "per_device_train_batch_size", "num_epochs": "num_train_epochs",
           "log_every": "logging_steps", "save_every": "save_steps", "eval_every": "eval_steps",
           "lr_scheduler": "lr_scheduler_type", "adam_eps": "adam_epsilon", "mixed_precision": "bf16 / fp16"}


def renamed(data: dict, fields: set[str], source: str) -> dict:
    """`data` with TRL's names of rlhfkit fields renamed (model_name_or_path -> model) where the
    config has the field; giving both names is an error."""
    out = dict(data)
    for old, new in ALIASES.items():
        if old in out and new in fields:
            if new in out:
                raise ConfigError(f"{source}: '{old}' is TRL's name for '{new}'; give one of them")
            out[new] = out.pop(old)
    return out


def explain(name: str, fields: set[str], config_name: str) -> str:
    """Why `name` is not a field of a config with `fields`, in a clause."""
    if name in RENAMED:
        return f"'{name}' is now '{RENAMED[name]}' (transformers' name)"
    if name in EQUIVALENTS and EQUIVALENTS[name][0] in fields:
        return f"{name} is TRL's option; rlhfkit's equivalent is {EQUIVALENTS[name][1]}"
    if name in UNSUPPORTED or name in EQUIVALENTS or name in ALIASES:
        return f"'{name}' is a transformers/TRL option that rlhfkit's {config_name} does not support"
    close = difflib.get_close_matches(name, sorted(fields), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "see --help for the fields"
    return f"'{name}' is unknown; {hint}"
