"""The actor-critic model, the separate critic, and reading a reward model's score.

Seed 002 Part 3: "a single Large Language Model with a shared body and two separate heads":
the policy (LM) head and the value head, a linear layer on the last hidden state.
OpenRLHF and verl instead keep the critic as a separate model; both are here.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf.algos import last_token_index

VALUE_HEAD_FILE = "value_head.safetensors"


def _hidden_size(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot find the hidden size of {type(config).__name__}")


class PolicyWithValueHead(nn.Module):
    """A causal LM (the actor) plus a scalar value head on its last hidden state (the critic).

    One forward pass gives both: ``logits`` (B, L, V) and ``values`` (B, L), where
    ``values[:, t]`` is V(s_t) for the state ending at token t. The wrapped ``policy`` may
    be a peft model; the value head is always trained in full.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(_hidden_size(policy.config), 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (_hidden_size(policy.config) + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids, attention_mask, position_ids=None, **sampling):
        """``(logits, values)``; with the keyword arguments of a sampling step (``past_key_values``,
        ``use_cache``, ``logits_to_keep``), the policy's own output alone. Sampling then goes through
        this module, which under FSDP is the root that gathers the policy's weights."""
        if sampling:
            return self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **sampling)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1]  # (B, L, H), after the final norm
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # (B, L)
        return out.logits, values

    def generate(self, *args, **kwargs):
        """The policy's ``generate`` (``--rollout-engine generate`` on a sharded model)."""
        return self.policy.generate(*args, **kwargs)

    def save_value_head(self, directory: str, state: dict | None = None) -> None:
        """``value_head.safetensors``; ``state``: the head's weights gathered from its shards (FSDP)."""
        state = self.value_head.state_dict() if state is None else state
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  os.path.join(directory, VALUE_HEAD_FILE))

    def load_value_head(self, directory: str) -> None:
        self.value_head.load_state_dict(load_file(os.path.join(directory, VALUE_HEAD_FILE)))


class Critic(nn.Module):
    """A separate critic: a one-label sequence-classification model read at every token.

    Initialise it from the reward model (OpenRLHF's default) or from the policy (a fresh
    head). It saves as a plain ``AutoModelForSequenceClassification``.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.model = classifier

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, attention_mask, position_ids=None):
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        return token_scores(self.model, input_ids, attention_mask, position_ids)  # (B, L)


class PolicyAndCritic(nn.Module):
    """The policy and a separate :class:`Critic` as one module, for an engine that trains one model per
    backward (DeepSpeed): it is prepared, optimised and checkpointed as one. Its forward is
    :class:`PolicyWithValueHead`'s: ``(logits, values)``, each computed as the two models compute them
    apart; with a sampling step's keyword arguments, the policy's own output."""

    def __init__(self, policy: nn.Module, critic: Critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids, attention_mask, position_ids=None, **sampling):
        if sampling:
            return self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **sampling)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits
        return logits, self.critic(input_ids, attention_mask)

    def generate(self, *args, **kwargs):
        """The policy's ``generate`` (``--rollout-engine generate`` on a sharded model)."""
        return self.policy.generate(*args, **kwargs)


def _score_head(classifier: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        head = getattr(classifier, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(classifier).__name__} has no 'score' head")


def token_scores(classifier, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """The scalar head applied at every position of a sequence classifier (peft or not).

    Shape:
        input_ids, attention_mask: (B, L) -> (B, L), float32.
    """
    if hasattr(classifier, "get_base_model"):  # peft: the adapters live inside the base model
        classifier = classifier.get_base_model()
    body = getattr(classifier, classifier.base_model_prefix)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    return _score_head(classifier)(hidden).squeeze(-1).float()


def sequence_scores(reward_model, input_ids, attention_mask) -> torch.Tensor:
    """The reward model's score, read where transformers reads it (:func:`score_index`).

    Positions come from ``attention_mask``, so a left-padded row scores as the same row
    unpadded does in ``AutoModelForSequenceClassification``.

    Shape:
        input_ids, attention_mask: (B, L) -> (B,), float32.
    """
    per_token = token_scores(reward_model, input_ids, attention_mask, position_ids_from_mask(attention_mask))
    return gather_at(per_token, score_index(input_ids, attention_mask, reward_model.config.pad_token_id))


def member_scores(reward_models: list, input_ids, attention_mask) -> torch.Tensor:
    """Each reward model's :func:`sequence_scores`, one column per member of an ensemble.

    Shape:
        input_ids, attention_mask: (B, L) -> (B, K), float32.
    """
    return torch.stack([sequence_scores(m, input_ids, attention_mask) for m in reward_models], dim=1)


def score_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Where a reward model's score is read: the last token that is neither padding nor PAD.

    This is the rule of transformers' ``*ForSequenceClassification`` (the rightmost token
    that is not ``config.pad_token_id``), so a reward model scores the same here, in
    ``rlhf rm`` training and in plain transformers or TRL. When PAD is EOS (GPT-2, Llama 3
    with PAD set to EOS), that is the last token *before* the closing EOS: the score does not
    see the EOS. Deliberately so: a head trained at the EOS would be read one token early by
    every transformers user of the model. Whether a response finished is ``--missing-eos-penalty``'s
    business in PPO and GRPO.

    Shape:
        input_ids, attention_mask: (B, L) -> (B,), long.
    """
    keep = attention_mask.bool()
    if pad_token_id is not None:
        keep = keep & (input_ids != pad_token_id)
    return last_token_index(keep)


def gather_at(per_token: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``per_token[b, index[b]]``. Shape: (B, L), (B,) -> (B,)."""
    return per_token.gather(1, index[:, None]).squeeze(1)


def gather_last(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``per_token`` at the last position where ``mask`` is 1. Shape: (B, L) -> (B,)."""
    return gather_at(per_token, last_token_index(mask))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding changes nothing.

    Shape:
        attention_mask: (B, L) -> (B, L), long.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---- reward normalisation stored with the reward model (seed 003: calibration) ------------

def set_score_stats(reward_model, mean: float, std: float) -> None:
    """Record the mean and std of the reward model's scores in its config (saved with it)."""
    reward_model.config.rlhf_score_mean = float(mean)
    reward_model.config.rlhf_score_std = float(std)


def get_score_stats(reward_model) -> tuple[float, float] | None:
    """``(mean, std)`` stored by :func:`set_score_stats`, or ``None``."""
    mean = getattr(reward_model.config, "rlhf_score_mean", None)
    std = getattr(reward_model.config, "rlhf_score_std", None)
    return None if mean is None or std is None else (float(mean), float(std))

