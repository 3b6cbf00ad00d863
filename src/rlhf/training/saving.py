"""The final model directory of a run, written whole or not at all.

Everything goes to ``OUTPUT_DIR/.tmp-final`` first and is moved into place only once all of it
is written, one named file last (``config.json`` for a model, ``ensemble.json`` for an
ensemble), so a reader that finds that file finds the whole model, and a save that fails (a
full disk) leaves no ``config.json`` without weights. The final model of SFT, RM, DPO, PPO and
GRPO, an ensemble's top directory and ``--stop-on-overoptimisation``'s best policy all go
through :func:`staged`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from contextvars import ContextVar

from rlhf.training.checkpoints import Checkpointer, release_output_dir
from rlhf.errors import UserError
from rlhf.training.logs import write_model_card

FINAL: ContextVar[dict | None] = ContextVar("rlhf_final", default=None)
"""The Python API's view of what a run saved, while it asks (None otherwise): :func:`save_final` puts
each model it writes under ``["models"][directory]`` (model and tokenizer, in memory), and
:func:`announce_saved` the run's final directory under ``["path"]``."""


def remember(directory: str, model=None, tokenizer=None, is_final: bool = False) -> None:
    """Note for the Python API that ``directory`` holds ``model`` (None: what it holds is not in memory),
    and with ``is_final`` that it is the run's final model."""
    final = FINAL.get()
    if final is not None:
        final.setdefault("models", {})[os.path.abspath(directory)] = (model, tokenizer) if model is not None else None
        if is_final:
            final["path"] = directory


@contextlib.contextmanager
def staged(out: str, last: str = "config.json"):
    """A fresh, empty ``out/.tmp-final`` to write into; when the block ends without an error, every
    entry in it replaces its namesake in ``out``, ``last`` last. The temporary directory is removed
    in any case; an ``OSError`` is the caller's to word."""
    tmp = os.path.join(out, ".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        for name in sorted(os.listdir(tmp), key=lambda n: n == last):
            target = os.path.join(out, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def full_state_dict(accelerator, module) -> dict | None:
    """Under FSDP or DeepSpeed ZeRO-3, ``module``'s whole weights gathered from every process's shards,
    on the main process (the others get an empty dict); every process must call it. ``module`` may be a
    part of the prepared model (PPO's policy, its value head). None where every process holds the whole
    model: one process, DDP, ZeRO stages 1 and 2."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return _zero3_full_state_dict(accelerator, module) if plugin is not None and plugin.zero_stage == 3 else None
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _zero3_full_state_dict(accelerator, module) -> dict:
    """ZeRO-3's partitioned parameters gathered one module at a time (so one layer's whole weights are
    alive at a time, as DeepSpeed's own 16-bit save does), copied to the CPU on the main process. Keys
    are ``module.state_dict()``'s, tied weights under each of their names; buffers are never partitioned."""
    import deepspeed

    main, out = accelerator.is_main_process, {}
    for prefix, sub in module.named_modules():
        own = {name: p for name, p in sub._parameters.items() if p is not None}
        with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=None):
            if main:
                out.update({f"{prefix}.{name}" if prefix else name: p.detach().cpu().clone() for name, p in own.items()})
    if main:
        buffers = dict(module.named_buffers())
        out.update({k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k in buffers})
    return out


def save_final(accelerator, model, tokenizer, cfg, title: str, metrics: dict[str, float],
               checkpointer: Checkpointer | None = None, announce: bool = True) -> None:
    """The final HF-format directory: weights (LoRA merged if asked), tokenizer, model card, through
    :func:`staged`. A failed save is one line naming the directory, the error and the last
    checkpoint. ``announce``: the run's model is complete (:func:`announce_saved`); off for a save
    that more files follow (PPO's value head) or that is not the run's (``OUTPUT/best``).
    """
    from rlhf.models import save_pretrained, unwrap

    accelerator.wait_for_everyone()
    unwrapped = unwrap(model)
    gathered = full_state_dict(accelerator, unwrapped)  # every process takes part where the weights are sharded
    if accelerator.is_main_process:
        try:
            with staged(cfg.output_dir) as tmp:
                save_pretrained(unwrapped, tokenizer, tmp, merge_adapters=cfg.merge_lora, state_dict=gathered)
                write_model_card(cfg, tmp, title, metrics)
        except OSError as e:
            last = checkpointer.latest() if checkpointer else None
            raise UserError(f"--output-dir {cfg.output_dir}: cannot save the final model ({e.strerror or e}); "
                            f"nothing of it was written; last checkpoint: {last or 'none'}") from None
    remember(cfg.output_dir, unwrapped, tokenizer)
    accelerator.wait_for_everyone()
    if announce:
        announce_saved(accelerator, cfg.output_dir)


def announce_saved(accelerator, directory: str) -> None:
    """The run's model is complete: its output directory is free again, and one line says where."""
    release_output_dir(directory)
    if FINAL.get() is not None:
        FINAL.get()["path"] = directory
    accelerator.print(f"saved model to {directory}")
