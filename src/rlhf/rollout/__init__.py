"""Generation behind one small interface, so an inference engine (vLLM) can replace ours.

A :class:`Rollout` needs two things (see ``docs/rollout.md``):

* ``generate(prompts, params)``: token-id prompts in, a :class:`RolloutBatch` out;
* ``load_weights(named_tensors)``: take the policy's new weights after an update.

:class:`HFRollout` is the default (``make_rollout("auto", ...)``): a KV-cache sampling loop over a transformers
causal LM (or its ``generate``), left padding, one prefill per prompt, and early stop once
every sequence has produced EOS. It shares the live policy module, so ``load_weights`` has
nothing to copy. A vLLM engine would implement the same two methods (``LLM.generate``
with ``SamplingParams``; weights pushed through its model runner's ``load_weights``)
without any change to the recipes. :class:`StaticRollout` (``--rollout-engine static``) is
the GPU candidate: a static KV cache whose decode step is replayed as a CUDA graph, on its own
bf16 copy of the policy that ``load_weights`` refreshes after every update.
"""

from rlhf.rollout.base import Rollout, RolloutBatch, SamplingParams, concat_batches, response_mask_from_ids
from rlhf.rollout.hf import HFRollout
from rlhf.rollout.select import make_rollout
from rlhf.rollout.static import StaticRollout, merged_named_weights

__all__ = ["HFRollout", "Rollout", "RolloutBatch", "SamplingParams", "StaticRollout", "concat_batches", "make_rollout",
           "merged_named_weights", "response_mask_from_ids"]
