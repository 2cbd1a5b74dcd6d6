"""From a batch of logits to the next tokens: greedy, temperature, top-k, top-p.

Sampling uses the exponential race: `argmax(p / q)` with q ~ Exp(1) i.i.d. is
distributed exactly as Categorical(p), and lets each row draw its noise from
its own seeded generator, so a seeded request gives the same tokens whatever
else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of the batch."""

    temperature: float
    top_k: int  # 0 = off
    top_p: float
    generator: Optional[torch.Generator]  # None: the engine's shared generator
    num_logprobs: Optional[int]  # None: no logprobs


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: {token id: logprob} for the top-k and the sampled token, or None.
    logprobs: list[Optional[dict[int, float]]]


def filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The distribution rows are sampled from.

    logits [B, V] fp32; temperature [B] (> 0); top_k [B] int (0 = off);
    top_p [B]. Applies temperature, then top-k, then top-p (keeping the most
    likely tokens whose cumulative probability, before each, is below top_p),
    as transformers' warpers do. Returns probabilities [B, V].
    """
    x = logits / temperature[:, None]
    sorted_x, order = x.sort(dim=-1, descending=True)
    vocab = x.shape[-1]
    rank = torch.arange(vocab, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)
    sorted_x = sorted_x.masked_fill(rank >= k[:, None], float("-inf"))
    p = sorted_x.softmax(dim=-1)
    mass_before = p.cumsum(dim=-1) - p
    # top_p == 1 keeps everything even where rounding lifts the cumulative sum past 1.
    drop = (mass_before >= top_p[:, None]) & (rank > 0) & (top_p < 1.0)[:, None]
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    x = torch.full_like(x, float("-inf")).scatter_(-1, order, sorted_x)
    return x.softmax(dim=-1)


class Sampler:
    """Samples one token per row, never an id at or above `vocab_limit`."""

    def __init__(self, vocab_limit: int, generator: torch.Generator):
        self.vocab_limit = vocab_limit
        self.generator = generator

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        logits = logits[:, : self.vocab_limit].float()  # [B, vocab_limit]
        device = logits.device
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
        if sampled:
            idx = torch.tensor(sampled, device=device)
            probs = filtered_probs(
                logits[idx],
                torch.tensor([rows[i].temperature for i in sampled], device=device),
                torch.tensor([rows[i].top_k for i in sampled], device=device),
                torch.tensor([rows[i].top_p for i in sampled], device=device),
            )
            noise = torch.empty_like(probs)
            shared = [j for j, i in enumerate(sampled) if rows[i].generator is None]
            if shared:
                noise[shared] = torch.empty((len(shared), probs.shape[1]), device=device).exponential_(
                    generator=self.generator
                )
            for j, i in enumerate(sampled):
                if rows[i].generator is not None:
                    noise[j].exponential_(generator=rows[i].generator)
            noise.clamp_(min=torch.finfo(torch.float32).tiny)
            tokens[idx] = (probs / noise).argmax(dim=-1)
        token_list = tokens.tolist()

        logprobs: list[Optional[dict[int, float]]] = [None] * len(rows)
        wanted = [i for i, r in enumerate(rows) if r.num_logprobs is not None]
        if wanted:
            lp = logits[wanted].log_softmax(dim=-1)
            k = max(rows[i].num_logprobs for i in wanted)
            top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
            chosen = lp.gather(1, tokens[wanted][:, None])[:, 0].tolist()
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for j, i in enumerate(wanted):
                n = rows[i].num_logprobs
                d = dict(zip(top_i[j][:n], top_v[j][:n]))
                d[token_list[i]] = chosen[j]
                logprobs[i] = d
        return SampleResult(token_ids=token_list, logprobs=logprobs)
