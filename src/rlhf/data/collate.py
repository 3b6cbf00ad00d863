"""Batching: padding and the masks each recipe needs."""

from __future__ import annotations

import torch


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """Pad lists of ids to one length. Shape: -> (B, max_len), long."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if side == "right":
                out[i, : len(s)] = torch.tensor(s)
            else:
                out[i, width - len(s) :] = torch.tensor(s)
    return out


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the response)."""
    ids = [e["input_ids"] for e in examples]
    return {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(s) for s in ids], 0),
            "labels": pad([e["labels"] for e in examples], -100)}


def collate_packed(examples: list[dict], pad_id: int, block_mask: bool = True) -> dict[str, torch.Tensor]:
    """Padding-free SFT batch: all examples in one row, positions restarting per example.

    Flash-attention kernels read the boundaries from the restarting ``position_ids``
    (``block_mask=False``). Other kernels (SDPA, eager) get a (1, 1, L, L) boolean
    block-diagonal causal mask, so no example attends to another. ``labels`` carry -100 on
    each example's first token, so none is trained to predict the next one's start.
    """
    ids, labels, positions, segments = [], [], [], []
    for k, e in enumerate(examples):
        ids += e["input_ids"]
        labels += [-100] + e["labels"][1:]
        positions += list(range(len(e["input_ids"])))
        segments += [k] * len(e["input_ids"])
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
             "position_ids": torch.tensor([positions])}
    if block_mask:
        seg = torch.tensor(segments)
        causal = torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool))
        batch["attention_mask"] = (causal & (seg[:, None] == seg[None, :]))[None, None]
    return batch


def collate_preference(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded, for one concatenated forward.

    ``response_mask[i, t]`` is 1 where token t belongs to the reply. Shapes: (2B, L).
    """
    rows, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for e in examples:
            rows.append(e["prompt_ids"] + e[key])
            masks.append([0] * len(e["prompt_ids"]) + [1] * len(e[key]))
    batch = {"input_ids": pad(rows, pad_id), "attention_mask": pad([[1] * len(r) for r in rows], 0),
             "response_mask": pad(masks, 0)}
    if all("margin" in e for e in examples):
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
    return batch


def collate_prompts(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation. Shapes: (B, P)."""
    ids = [e["prompt_ids"] for e in examples]
    return {"input_ids": pad(ids, pad_id, side="left"),
            "attention_mask": pad([[1] * len(s) for s in ids], 0, side="left")}
