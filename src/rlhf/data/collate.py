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


def collate_preference_shared(examples: list[dict], pad_id: int, row_tokens: int = 512) -> dict[str, torch.Tensor]:
    """Pairs as ``[prompt | chosen | rejected]`` segments packed into rows: the prompt is encoded once.

    Rejected tokens continue the prompt's positions and cannot see the chosen ones, so each
    reply is scored exactly as in its own sequence. Segments are packed first-fit decreasing
    into rows of at most ``row_tokens`` (padding-free but for the row ends), with a
    (R, 1, L, L) boolean mask. ``src[k]``/``tgt[k]`` are flat indices (into R*L) of the logits
    that predict reply token ``tgt[k]``; ``owner[k]`` is its sequence: pair i's chosen is i,
    its rejected B + i.
    """
    # First-fit decreasing: longest segments first, each into the first row with room.
    size = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples]
    rows: list[list[dict]] = []
    fills: list[int] = []
    for i in sorted(range(len(examples)), key=lambda k: -size[k]):
        r = next((r for r, f in enumerate(fills) if f + size[i] <= row_tokens), None)
        if r is None:
            rows.append([])
            fills.append(0)
            r = len(rows) - 1
        rows[r].append({"i": i, **examples[i]})
        fills[r] += size[i]
    width = max(sum(len(s["prompt_ids"]) + len(s["chosen_ids"]) + len(s["rejected_ids"]) for s in r) for r in rows)
    B = len(examples)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    src, tgt, owner = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            P, C, J = len(s["prompt_ids"]), len(s["chosen_ids"]), len(s["rejected_ids"])
            base = r * width + at
            ids[r, at : at + P + C + J] = torch.tensor(s["prompt_ids"] + s["chosen_ids"] + s["rejected_ids"])
            pos[r, at : at + P + C] = torch.arange(P + C)
            pos[r, at + P + C : at + P + C + J] = torch.arange(P, P + J)
            causal = torch.tril(torch.ones(P + C + J, P + C + J, dtype=torch.bool))
            causal[P + C :, P : P + C] = False  # rejected never sees chosen
            mask[r, 0, at : at + P + C + J, at : at + P + C + J] = causal
            for k in range(C):  # chosen token k is predicted from the token before it
                src.append(base + P + k - 1)
                tgt.append(base + P + k)
                owner.append(s["i"])
            for k in range(J):  # rejected token 0 is predicted from the prompt's last token
                src.append(base + (P - 1 if k == 0 else P + C + k - 1))
                tgt.append(base + P + C + k)
                owner.append(B + s["i"])
            at += P + C + J
        for t in range(at, width):
            mask[r, 0, t, t] = True  # padding attends to itself only (no empty softmax rows)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "src": torch.tensor(src),
            "tgt": torch.tensor(tgt), "owner": torch.tensor(owner), "n_pairs": torch.tensor(B)}
