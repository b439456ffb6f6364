"""Rankings as one row each: the prompt once, then every completion, each seeing only the prompt
and itself.

The paper forwards each completion of a ranking once; the K completions still repeat their
prompt K times. Here a ranking is one row, `prompt | completion 1 | ... | completion K`:

- each completion's tokens take the positions they would have after the prompt alone;
- a token attends to the prompt and to the earlier tokens of its own completion, never to
  another completion;

so every completion's hidden states equal those of `prompt + completion` forwarded alone, and
the prompt is forwarded once. The shared part is the longest common prefix of the completions'
token ids, up to where the first response starts, so a tokeniser that merges across the prompt's
end costs sharing, never correctness. The reward is `scoring.score`'s: head on the last token,
plus the weighted mean log-likelihood of the response tokens, computed on those tokens only.

This layout needs a forward that takes positions and a per-row attention mask: the lean forward
(`flywheel_model.llama`). `fit_reward_model` uses it when the model has one, and one row per completion
otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from flywheel_model import llama, scoring
from flywheel_model.scoring import EncodedRanking, right_pad


class SharedBatch(NamedTuple):
    input_ids: torch.Tensor  # (R, T): one row per ranking, right-padded
    positions: torch.Tensor  # (R, T): each token's position in prompt + its completion
    mask: torch.Tensor  # (R, T, T): True where a token attends
    last: torch.Tensor  # (N, 2): row and column of each completion's last token
    tiers: torch.Tensor  # (N,)
    group: torch.Tensor  # (N,) the ranking (row) of each completion
    targets: torch.Tensor  # (M, 2): row and column of every response token
    predictors: torch.Tensor  # (M, 2): row and column of the state that predicts it
    owner: torch.Tensor  # (M,) the completion each response token belongs to
    counts: torch.Tensor  # (N,) response tokens per completion


def shared_prefix(ranking: EncodedRanking) -> int:
    """Tokens the completions of a ranking share, none past the earliest response start."""
    first = ranking[0][0]
    limit = min(start for _, start, _ in ranking)
    n = 0
    while n < limit and all(n < len(ids) and ids[n] == first[n] for ids, _, _ in ranking):
        n += 1
    return n


def packed_length(ranking: EncodedRanking) -> int:
    """Tokens of the ranking's row in `collate`: the shared prompt once, then each completion."""
    shared = shared_prefix(ranking)
    return shared + sum(len(ids) - shared for ids, _, _ in ranking)


def collate(encoded: Sequence[EncodedRanking], pad_id: int) -> SharedBatch:
    """One row per ranking; completions in the ranking's order, as `reward.collate_rankings`."""
    rows: list[list[int]] = []
    positions: list[list[int]] = []
    segments: list[list[int]] = []  # per token: 0 the shared prompt, k completion k
    last: list[tuple[int, int]] = []
    targets: list[tuple[int, int]] = []
    predictors: list[tuple[int, int]] = []
    tiers: list[int] = []
    group: list[int] = []
    owner: list[int] = []
    counts: list[int] = []
    for r, ranking in enumerate(encoded):
        shared = shared_prefix(ranking)
        row, pos, seg = list(ranking[0][0][:shared]), list(range(shared)), [0] * shared
        for k, (ids, start, tier) in enumerate(ranking, start=1):
            offset = len(row) - shared  # original index t >= shared sits at column t + offset
            row += ids[shared:]
            pos += range(shared, len(ids))
            seg += [k] * (len(ids) - shared)
            for t in range(start, len(ids)):
                targets.append((r, t + offset))
                predictors.append((r, t - 1 + (offset if t - 1 >= shared else 0)))
                owner.append(len(tiers))
            last.append((r, len(ids) - 1 + offset))
            tiers.append(tier)
            group.append(r)
            counts.append(len(ids) - start)
        rows.append(row)
        positions.append(pos)
        segments.append(seg)
    input_ids, _ = right_pad(rows, pad_id)
    segment, _ = right_pad(segments, -1)  # -1: padding
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
    return SharedBatch(
        input_ids=input_ids,
        positions=right_pad(positions, 0)[0],
        mask=mask,
        last=torch.tensor(last),
        tiers=torch.tensor(tiers),
        group=torch.tensor(group),
        targets=torch.tensor(targets),
        predictors=torch.tensor(predictors),
        owner=torch.tensor(owner),
        counts=torch.tensor(counts),
    )


def score(
    model: torch.nn.Module,
    weights: llama.Weights,
    head: scoring.ScoreHead,
    batch: SharedBatch,
) -> torch.Tensor:
    """Rewards of a batch's completions, as `scoring.score` gives them one row each. -> (N,)

    weights: `llama.read(model)`, read by the caller once per fit."""
    device = head.linear.weight.device
    b = SharedBatch(*(t.to(device) for t in batch))
    hidden = llama.final_hidden(weights, b.input_ids, b.positions, b.mask)
    states = hidden[b.predictors[:, 0], b.predictors[:, 1]]  # (M, H)
    logp = scoring.token_logprobs(model, states, b.input_ids[b.targets[:, 0], b.targets[:, 1]])
    loglik = logp.new_zeros(len(b.counts)).index_add(0, b.owner, logp) / b.counts
    return head(hidden[b.last[:, 0], b.last[:, 1]]) + head.likelihood * loglik
