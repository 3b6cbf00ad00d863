"""A run's setup: the accelerator (and the output directory it claims), the policy and its
tokenizer, the data, the optimizer, and :func:`start`, which prepares them for ``accelerate``
and resumes from a checkpoint.
"""

from __future__ import annotations

import os

import torch

from rlhf.errors import UserError
from rlhf.training.checkpoints import Checkpointer, TrainState, claim_output_dir, remove_old_run, run_record
from rlhf.training.config import TrainConfig, trackers
from rlhf.training.logs import RunLogger


def make_accelerator(cfg: TrainConfig):
    """An ``Accelerator`` (DDP/FSDP/DeepSpeed come from ``accelerate launch``) and the seed set.

    Its trackers are --report-to's; TensorBoard writes under ``OUTPUT_DIR/tensorboard``.

    ``cfg.output_dir`` is claimed first (:func:`claim_output_dir`): locked, and refused if it
    holds another run's results and neither --resume nor --overwrite-output-dir is given.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 and cuda and torch.cuda.is_bf16_supported()
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "tensorboard"))
    cpu, group = process_options(cfg)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=cpu,
                              log_with=trackers(cfg.report_to) or None, project_config=project,
                              kwargs_handlers=[group] if group else None)
    if not cuda and _launched_with("FSDP"):
        fsdp_on_cpu(accelerator)
    if _launched_with("DEEPSPEED"):
        zero3_loads_whole(accelerator)
    if _launched_with("FSDP") and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        # transformers would then load real weights on local rank 0 only, for prepare to broadcast; but the
        # reference, the reward model and a policy's frozen copy are never prepared, and were zeros elsewhere.
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        accelerator.print("fsdp_cpu_ram_efficient_loading: every process loads every model whole (the reference "
                          "and reward models are not broadcast from rank 0)")
    claim_output_dir(cfg, accelerator.is_main_process)
    accelerator.wait_for_everyone()  # every process checked the directory before the main one writes
    accelerator.print(f"accelerate {accelerator.distributed_type.value}, processes: {accelerator.num_processes}, "
                      f"device: {accelerator.device}, mixed precision: {accelerator.mixed_precision}")
    set_seed(cfg.seed)
    return accelerator


def process_options(cfg: TrainConfig):
    """``(cpu, InitProcessGroupKwargs or None)``: how this process joins the others, the same for every
    ``Accelerator`` or ``PartialState`` of a run (the first one made fixes the state they all share).

    Without a GPU ``cpu=True`` makes accelerate run DDP over gloo under ``accelerate launch``, a DeepSpeed
    config silently ignored; DeepSpeed on CPU needs ``cpu=False``, gloo and DeepSpeed's CPU accelerator.
    Launched, collectives wait at most --ddp-timeout seconds.
    """
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    cuda, deepspeed = torch.cuda.is_available(), _launched_with("DEEPSPEED")
    if deepspeed and not cuda:  # oneccl is not installed: DeepSpeed falls back to gloo
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return not cuda, None
    return not cuda and not deepspeed, InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout),
                                                              backend="gloo" if deepspeed and not cuda else None)


def _launched_with(engine: str) -> bool:
    """Whether ``accelerate launch`` asked for ``engine`` (its config sets ACCELERATE_USE_FSDP, ...)."""
    return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"


def fsdp_on_cpu(accelerator) -> None:
    """Run accelerate's FSDP path on CPU processes (gloo), as on GPUs.

    accelerate switches to FSDP only for GPU-like process types; on CPU processes it keeps
    MULTI_CPU and runs DDP, the FSDP config silently ignored. Here the state that every
    ``AcceleratorState``/``PartialState`` shares is given what its GPU path writes: the FSDP type and
    the plugin read from ``accelerate launch``'s environment. FSDP2 shards, gathers and
    checkpoints over gloo as over NCCL (``tests/test_sharded.py``).
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def zero3_loads_whole(accelerator) -> None:
    """Under DeepSpeed ZeRO-3, every model is loaded whole, and the trained one is partitioned by ``prepare``.

    With ``zero3_init_flag`` transformers would load each model already partitioned (``zero.Init``): the
    reference (a copy of the policy), the reward model and the teachers are never prepared, so their
    forwards would see empty shards, and rebuilding a model to save it would be a collective on one
    process. As with FSDP's ``fsdp_cpu_ram_efficient_loading``, the flag is turned off and said once.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not plugin.zero3_init_flag:
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    plugin.zero3_init_flag, plugin.dschf = False, None
    unset_hf_deepspeed_config()
    accelerator.print("zero3_init_flag: every process loads every model whole; prepare partitions the trained one "
                      "(the reference and reward models are not partitioned)")


def deepspeed_settings(cfg: TrainConfig, accelerator) -> None:
    """Give a DeepSpeed engine what the run's flags say, before ``prepare`` builds it: the micro-batch
    per process (no dataloader is prepared, so a config's ``auto`` has nothing to be filled from), one
    accumulation step per engine step (rlhf's --grad-accum marks the boundary), and --max-grad-norm, which
    the engine applies itself (0: none)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise UserError(f"the DeepSpeed config's gradient_accumulation_steps {ds['gradient_accumulation_steps']}: "
                        "set it to 1 and pass --grad-accum (rlhf accumulates micro-batches itself)")
    # The engine steps where rlhf marks a step's last micro-batch (rlhf.training.loop.micro_batch).
    ds["gradient_accumulation_steps"] = 1
    ds["train_micro_batch_size_per_gpu"] = max(1, cfg.batch_size // accelerator.num_processes)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * accelerator.num_processes
    clip = float(cfg.max_grad_norm or 0.0)
    if ds.get("gradient_clipping", "auto") not in ("auto", clip):
        accelerator.print(f"gradient_clipping: --max-grad-norm {clip:g} replaces the DeepSpeed config's "
                          f"{ds['gradient_clipping']}")
    ds["gradient_clipping"] = clip


def load_policy(cfg: TrainConfig, path: str | None = None):
    """Tokenizer and causal LM from ``path`` (default ``cfg.model``), with LoRA / checkpointing.

    --max-length beyond the model's positions is refused here, before the data is read.
    """
    from rlhf.models import load_causal_lm, load_tokenizer, set_gradient_checkpointing

    path = path or cfg.model
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(path, trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    fit_default_length(cfg, model, f"--model {path}")
    check_positions(model, cfg.max_length, "--max-length", f"--model {path}")
    if cfg.lora:
        model = with_lora(cfg, model)
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    return tokenizer, model


def load_reference(cfg, policy, tokenizer):
    """The frozen reference: ``cfg.ref_model`` when given (it must share the policy's tokenizer), else
    the policy's frozen copy, or with LoRA its base with the adapters off (:class:`rlhf.models.Reference`)."""
    from rlhf.models import Reference, load_causal_lm, load_tokenizer

    if not getattr(cfg, "ref_model", None):
        return Reference(policy)
    if load_tokenizer(cfg.ref_model, trust_remote_code=cfg.trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"--ref-model {cfg.ref_model}: its tokenizer differs from the policy's; the reference must "
                        "share the policy's tokenizer")
    model = load_causal_lm(cfg.ref_model, trust_remote_code=cfg.trust_remote_code,
                           attn_implementation=cfg.attn_implementation)
    if model is policy:  # ref_model= the very object being trained: its copy, or freezing it would freeze the policy
        return Reference(policy)
    return Reference(policy, model=model)


def with_lora(cfg: TrainConfig, model, task_type: str = "CAUSAL_LM"):
    """``model`` with LoRA adapters from the --lora-* flags; peft's refusal as one line naming the flag."""
    from rlhf.models import apply_lora

    try:
        return apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets(), task_type=task_type)
    except ValueError as e:  # peft: no module matches, a rank below 1, a module type it cannot adapt
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--lora-target-modules {cfg.lora_target_modules} (--lora-r {cfg.lora_r}) on --model "
                        f"{cfg.model}: peft refused it: {first}") from None


def max_positions(model) -> tuple[int, str] | None:
    """The longest sequence ``model``'s config allows and the config field that says so
    (``max_position_embeddings``, GPT-2's ``n_positions``), or None where it names no limit."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def fit_default_length(cfg: TrainConfig, model, whose: str) -> None:
    """A --max-length the user never set (the default 512) is lowered to ``model``'s positions, said once;
    one the user gave is checked as given (:func:`check_positions`)."""
    limit = max_positions(model)
    given = getattr(cfg, "given", None)
    if limit is not None and cfg.max_length > limit[0] and given is not None and "max_length" not in given:
        print(f"--max-length: the default {cfg.max_length} is beyond the {limit[0]} positions of {whose}; "
              f"using {limit[0]}")
        cfg.max_length = limit[0]


def check_positions(model, length: int, what: str, whose: str) -> None:
    """Refuse at start-up a sequence length beyond ``model``'s positions (one line naming
    ``what`` asked for it and ``whose`` limit it is), rather than an index error mid-run."""
    limit = max_positions(model)
    if limit is not None and length > limit[0]:
        raise UserError(f"{what} {length} is beyond the {limit[0]} positions of {whose} ({limit[1]} in its config); "
                        f"lower it to {limit[0]} or less")


def load_data(cfg: TrainConfig, source: str, kind: str, tokenizer, log=print):
    """Validate and tokenise a whole file before training; report skips and truncations."""
    if not source:
        raise UserError("--data is required")
    from rlhf.data import PLAIN_CHAT_TEMPLATE, Encoder, prepare

    encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    prepared = prepare(source, kind, encoder, cfg.on_bad_record)
    if encoder.used_plain_template and not tokenizer.chat_template:  # message data, a tokenizer without a template
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        log(f"{source}: the tokenizer has no chat template: messages are rendered with rlhf's plain template "
            "('Role: content' blocks), which is saved with the model so it renders them the same way")
    if kind == "prompt":  # each prompt knows its file:line, for errors about its completions
        for example, where in zip(prepared.examples, prepared.where):
            example["_where"] = where
    log(f"{source}: {len(prepared)} examples ({prepared.n_skipped} bad records skipped, "
        f"{prepared.n_prompt_truncated} prompts and {prepared.n_response_truncated} responses truncated)")
    return prepared


def adamw(cfg: TrainConfig, params, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW with --weight-decay, fused under ``--optim adamw_torch_fused``."""
    return torch.optim.AdamW(params, weight_decay=cfg.weight_decay, fused=cfg.optim == "adamw_torch_fused" or None,
                             **kwargs)


def make_optimizer(cfg: TrainConfig, params, total_steps: int, lr: float | None = None):
    """AdamW (``--optim``: torch's single-tensor or fused implementation) and the warmup + decay schedule
    from transformers."""
    from transformers import get_scheduler

    params = [p for p in params if p.requires_grad]
    optimizer = adamw(cfg, params, lr=lr or cfg.lr)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def start(cfg: TrainConfig, accelerator, model, optimizer, scheduler, total_steps: int, bar_keys: dict[str, str]):
    """Prepare for ``accelerate``, register the checkpoint state, resume if asked.

    This is where a run starts for real (model and data loaded and checked): only now does
    --overwrite-output-dir remove the earlier run's outputs, and a resumed run's metrics.jsonl
    lose the lines logged after its checkpoint.

    Returns ``(model, optimizer, state, checkpointer, logger)``.
    """
    deepspeed_settings(cfg, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state, scheduler)
    checkpointer = Checkpointer(accelerator, cfg.output_dir, cfg.save_total_limit, run_record(cfg))
    resumed = checkpointer.resume(cfg.resume)
    if state.step > total_steps:
        raise UserError(f"--resume {resumed}: its step {state.step} is past this run's {total_steps} steps "
                        "(raise --max-steps or --epochs)")
    state.first_step, state.skipped_before = state.step, state.skipped_steps
    if accelerator.is_main_process and cfg.overwrite_output_dir and not resumed:
        remove_old_run(cfg.output_dir)
    accelerator.wait_for_everyone()
    logger = RunLogger(cfg, accelerator, total_steps, state.step, bar_keys)
    if resumed:
        logger.event(state.step, f"resumed from {resumed}")
    return model, optimizer, state, checkpointer, logger
