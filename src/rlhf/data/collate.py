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


def collate_packed(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Padding-free SFT batch: all examples in one row, positions restarting per example.

    ``segment_ids`` numbers the examples, for the block-diagonal mask that
    :func:`rlhf.models.packed_logits` has transformers build; flash attention reads the
    boundaries from the restarting ``position_ids`` instead. ``labels`` carry -100 on each
    example's first token, so none is trained to predict the next one's start.
    """
    ids, labels, positions, segments = [], [], [], []
    for k, e in enumerate(examples):
        ids += e["input_ids"]
        labels += [-100] + e["labels"][1:]
        positions += list(range(len(e["input_ids"])))
        segments += [k] * len(e["input_ids"])
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions]),
            "segment_ids": torch.tensor([segments]), "branch_ids": torch.zeros(1, len(ids), dtype=torch.long)}


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


def pack_shared_prefixes(groups: list[tuple[list[int], list[list[int]]]], pad_id: int,
                         row_tokens: int = 512) -> dict[str, torch.Tensor]:
    """Groups ``(prefix, [continuation, ...])`` laid out as ``[prefix | c1 | c2 | ...]`` segments:
    each prefix is encoded once, however many continuations share it.

    Every continuation continues its prefix's positions and is to see the prefix and itself
    only, so each is scored exactly as in its own sequence: ``segment_ids`` numbers the groups
    of a row and ``branch_ids`` marks the prefix 0 and continuation j as j + 1, from which
    :func:`rlhf.models.packing.shared_prefix_mask` builds the mask (row padding: -1 in both).
    Groups of one continuation each are plain packed sequences, positions restarting per
    group, which flash attention reads from the positions alone. Groups are packed first-fit decreasing
    into rows of at most ``row_tokens`` (a longer group gets a row of its own). Continuations
    are numbered in the order given, group by group; for each continuation token, ``src``/``tgt``
    are the flat indices (into N*L) of the logits that predict it and of the token itself,
    ``owner`` its continuation's number and ``col`` its index within the continuation.
    Prefixes must not be empty (their last token predicts each continuation's first).
    """
    size = [len(p) + sum(len(c) for c in cs) for p, cs in groups]
    first = [0]  # number of each group's first continuation
    for _, cs in groups:
        first.append(first[-1] + len(cs))
    rows: list[list[int]] = []
    fills: list[int] = []
    for g in sorted(range(len(groups)), key=lambda k: -size[k]):
        r = next((r for r, f in enumerate(fills) if f + size[g] <= row_tokens), None)
        if r is None:
            rows.append([])
            fills.append(0)
            r = len(rows) - 1
        rows[r].append(g)
        fills[r] += size[g]
    width = max(fills, default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    branch = torch.full((len(rows), width), -1, dtype=torch.long)
    src, tgt, owner, col = [], [], [], []
    for r, row in enumerate(rows):
        at = 0
        for s, g in enumerate(row):
            prefix, conts = groups[g]
            P = len(prefix)
            if P == 0:
                raise ValueError("pack_shared_prefixes: an empty prefix cannot predict its continuations' first token")
            base = r * width + at
            ids[r, at : at + P] = torch.tensor(prefix)
            pos[r, at : at + P] = torch.arange(P)
            segment[r, at : at + P], branch[r, at : at + P] = s, 0
            end = at + P
            for j, c in enumerate(conts):
                C = len(c)
                ids[r, end : end + C] = torch.tensor(c, dtype=torch.long)
                pos[r, end : end + C] = torch.arange(P, P + C)
                segment[r, end : end + C], branch[r, end : end + C] = s, j + 1
                src += [base + P - 1] + list(range(r * width + end, r * width + end + C - 1))
                tgt += list(range(r * width + end, r * width + end + C))
                owner += [first[g] + j] * C
                col += list(range(C))
                end += C
            at = end
    return {"input_ids": ids, "position_ids": pos, "segment_ids": segment, "branch_ids": branch,
            "src": torch.tensor(src, dtype=torch.long), "tgt": torch.tensor(tgt, dtype=torch.long),
            "owner": torch.tensor(owner, dtype=torch.long), "col": torch.tensor(col, dtype=torch.long)}


def collate_preference_shared(examples: list[dict], pad_id: int, row_tokens: int = 512,
                              shared: bool = True) -> dict[str, torch.Tensor]:
    """Pairs as ``[prompt | chosen | rejected]`` segments (:func:`pack_shared_prefixes`): the prompt
    is encoded once. ``owner[k]`` is the sequence of token k: pair i's chosen is i, its rejected B + i.
    ``shared=False`` packs ``[prompt | chosen]`` and ``[prompt | rejected]`` as two sequences
    instead (flash attention's padding-free layout, as in TRL).
    """
    B = len(examples)
    pairs = [(e["prompt_ids"], [e["chosen_ids"], e["rejected_ids"]]) for e in examples]
    groups = pairs if shared else [(p, [c]) for p, cs in pairs for c in cs]
    batch = pack_shared_prefixes(groups, pad_id, row_tokens)
    owner = batch.pop("owner")  # 2i + 0 for pair i's chosen, 2i + 1 for its rejected, either way
    batch.pop("col")
    return {**batch, "owner": (owner % 2) * B + owner // 2, "n_pairs": torch.tensor(B)}
