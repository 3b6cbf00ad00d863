"""The model inside the wrappers that accelerate's ``prepare`` may put around it (DDP, FSDP, DeepSpeed)."""

from __future__ import annotations

import sys

from torch import nn


def unwrap(model):
    """``accelerator.unwrap_model(model)``: accelerate's ``extract_model_from_parallel``, called only
    where ``model`` may be a wrapper; any other model is returned as it is, as accelerate returns it.

    Each call of accelerate's function asks the package metadata whether DeepSpeed is installed (a few
    milliseconds), and the first one imports DeepSpeed where it is (half a second on CPU), to test for
    its engine; the recipes ask once or more a step, and on one process the answer is the model itself.
    A DeepSpeed engine exists only once ``deepspeed`` is imported, so without it only torch's wrappers
    (DDP, DataParallel, FSDP1, and the same under ``torch.compile``) are looked for, and with it its
    ``DeepSpeedEngine`` too (transformers' ``save_pretrained`` imports DeepSpeed wherever it is
    installed, so asking accelerate whenever the module is loaded cost 2 ms a call from then on).
    """
    if _maybe_wrapped(model):
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(model)
    return model


def _maybe_wrapped(model) -> bool:
    wrappers: tuple[type, ...] = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None:  # its engine may wrap the model (once imported; saving a model imports it)
        wrappers += (deepspeed.DeepSpeedEngine,)
    fsdp = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    if fsdp is not None:
        wrappers += (fsdp.FullyShardedDataParallel,)
    # torch.compile's wrapper holds the model as ``_orig_mod`` (a submodule, or in ``__dict__`` where
    # only regions were compiled); accelerate unwraps what is inside it.
    inside = (model, getattr(model, "_orig_mod", None), getattr(model, "__dict__", {}).get("_orig_mod"))
    return any(isinstance(m, wrappers) for m in inside)
