"""What of FSDP and DeepSpeed ZeRO-3 can be checked in one process (the recipes themselves run sharded on
two CPU processes in ``tests/test_sharded.py``, ``make test-sharded``).

The configs in ``configs/accelerate/`` load with accelerate's own loader and name the engine
and settings ``docs/scaling.md`` promises; a recipe under a sharding engine samples with
the loop over the live (gathered-on-forward) policy, never the static engine's whole-weight
copy; and a held-out pass gives every process as many forwards.
"""

import os
from types import SimpleNamespace

import pytest

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "accelerate")


@pytest.mark.parametrize("name,engine", [("cpu_ddp_2proc.yaml", "MULTI_GPU"), ("multi_gpu_ddp.yaml", "MULTI_GPU"),
                                         ("fsdp.yaml", "FSDP"), ("fsdp_cpu_2proc.yaml", "FSDP"),
                                         ("deepspeed_zero3.yaml", "DEEPSPEED"),
                                         ("deepspeed_zero3_cpu_2proc.yaml", "DEEPSPEED")])
def test_accelerate_configs_load_with_accelerate(name, engine):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(CONFIGS, name))
    assert config.distributed_type.value == engine
    if engine == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
    if engine == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3


@pytest.mark.parametrize("engine,sharded", [("FSDP", True), ("DEEPSPEED", True), ("MULTI_GPU", False), ("NO", False)])
def test_sharded_engines_never_get_a_whole_weight_engine_copy(engine, sharded, tiny_dir, tokenizer, monkeypatch):
    """Were the static engine the CUDA default, FSDP and ZeRO-3 would still sample with the loop
    over the live policy (whose forward gathers the shards), not a copy of whole weights."""
    from rlhf.models import load_causal_lm
    from rlhf.recipes.scoring import is_sharded
    from rlhf.rollout import HFRollout, select

    monkeypatch.setattr(select, "CUDA_DEFAULT", "static")
    monkeypatch.setattr(select, "StaticRollout", lambda *args, **kwargs: "static engine")
    accelerator = SimpleNamespace(distributed_type=SimpleNamespace(value=engine))
    assert is_sharded(accelerator) is sharded
    rollout = select.make_rollout("auto", load_causal_lm(tiny_dir), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                  "cuda", sharded=is_sharded(accelerator))
    assert isinstance(rollout, HFRollout) if sharded else rollout == "static engine"


def test_a_held_out_pass_gives_every_process_as_many_batches():
    """17 examples on 2 processes, 8 a batch: 9 and 8 examples, but two batches each (a sharded forward
    is a collective); the second process's last batch is example 0, counted 0 times. By hand."""
    from rlhf.training.loop import pass_batches

    assert pass_batches(17, 0, 2, 8) == [([0, 2, 4, 6, 8, 10, 12, 14], 8), ([16], 1)]
    assert pass_batches(17, 1, 2, 8) == [([1, 3, 5, 7, 9, 11, 13, 15], 8), ([0], 0)]
    assert pass_batches(3, 3, 4, 8) == [([0], 0)]
    assert pass_batches(5, 0, 1, 2) == [([0, 1], 2), ([2, 3], 2), ([4], 1)]
    assert pass_batches(0, 0, 2, 8) == []
