"""From a batch of logits to the next tokens: penalties and logit bias, greedy, temperature, top-k, top-p.

Presence and frequency penalties and logit_bias are one additive adjustment
of the raw logits, built per step for the rows of the requests that use them
(rows sampled on their request's terms) and applied before anything else;
the logprobs reported stay those of the model's own distribution.

Rows whose logits hold a NaN or an infinity (a numerical fault upstream) are
flagged rather than sampled from: their token would be meaningless.

Sampling uses the exponential race: `argmax(p / q)` with q ~ Exp(1) i.i.d. is
distributed exactly as Categorical(p). All rows are sampled at once with the
engine's generator; a seeded request's rows then redraw their noise from a
generator seeded by (the request's seed, the completion, the token's place
in it), so a seeded request gives the same tokens whatever else shares its
batch, and whether or not its tokens are speculated (a row verifying a
proposal draws the noise the token at its place would get anyway). Rows
with temperature 0 take the argmax.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .request import sample_seed

# Salt a seeded row's acceptance draw and its residual draw apart from its sampling noise.
VERIFY_SEED_SALT = 0x5DEECE66D
RESIDUAL_SEED_SALT = 0x27BB2EE687B0B0FD


def row_seed(host: dict, row: int, req, salt: int = 0) -> int:
    """The noise seed of a seeded request's sampled row: per (its seed, salted; its completion; the place in the
    completion of the token the row draws). `host` is the step's arrays."""
    place = int(host["positions"][host["logits_indices"][row]]) + 1 - len(req.prompt_token_ids)
    return sample_seed(req.params.seed ^ salt, int(host["sample_index"][row]), place)


def exponential_noise(
    like: torch.Tensor, generator: torch.Generator, seeded: torch.Generator, seeds: dict[int, int]
) -> torch.Tensor:
    """Exp(1) noise shaped like `like` [R, V] from `generator`, rows in `seeds` (row -> seed) redrawn from their own
    seed (`seeded` is reseeded for each), kept above 0 so that the race's division is finite."""
    noise = torch.empty_like(like).exponential_(generator=generator)
    for row, seed in seeds.items():
        noise[row].exponential_(generator=seeded.manual_seed(seed))
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)


@dataclass
class Proposals:
    """A draft model's proposals for a step: the sampled rows that check them, the tokens, their distributions."""

    rows: np.ndarray  # [P] int64: sampled rows of the step
    tokens: torch.Tensor  # [P] int64, on the device
    probs: torch.Tensor  # [P, vocab_limit] float32: the draft's distribution at each (one-hot for greedy rows)


@dataclass
class SamplingInputs:
    """Per sampled row: the parameters on the logits' device and on the host."""

    temperature: torch.Tensor  # [S] float32, on the logits' device
    top_k: torch.Tensor  # [S] int32
    top_p: torch.Tensor  # [S] float32
    host_temperature: np.ndarray  # the same, in host memory: decides which paths run without a device sync
    host_top_k: np.ndarray
    host_top_p: np.ndarray
    seeds: dict[int, int]  # row -> the seed of its noise (seeded requests)
    logprobs: dict[int, int]  # row -> how many top logprobs it wants
    adjust_index: Optional[torch.Tensor] = None  # [2, N] int64 on the logits' device: (row, token), each pair once
    adjust_value: Optional[torch.Tensor] = None  # [N] float32: what penalties and biases add to those logits
    counted: list[tuple[int, Counter]] = field(default_factory=list)  # (row, its completion's token counts)
    proposals: Optional[Proposals] = None  # a draft model's proposals, which rows check them (draft.py)

    @classmethod
    def of(cls, step, on_device, requests: Optional[dict] = None, device: Optional[torch.device] = None):
        """A step's sampling inputs: `on_device` is the step with its parameters on the logits' device.

        The rows sampled on a request's terms (`step.host_sampled_rows`) get
        the request's seeded generator for their completion, its logprobs, and
        its penalties (from their completion's token counts) and logit bias.
        """
        host = step.arrays
        seeds, logprobs, counted, parts = {}, {}, [], []
        for row in host["host_sampled_rows"].tolist() if requests is not None else ():
            req = requests[int(host["sample_request"][row])]
            p = req.params
            if p.seed is not None:
                seeds[row] = row_seed(host, row, req)
            if p.logprobs is not None:
                logprobs[row] = p.logprobs
            if p.adjusts_logits:
                tokens, values = req.logit_bias()
                if p.presence_penalty or p.frequency_penalty:
                    counts = req.completion(int(host["sample_index"][row])).counts
                    counted.append((row, counts))
                    if counts:
                        penalty = penalties(counts, p.presence_penalty, p.frequency_penalty)
                        tokens, values = sum_by_token((tokens, values), penalty) if len(tokens) else penalty
                if len(tokens):
                    parts.append((row, tokens, values))
        index, value = logit_adjustment(parts, on_device.temperature.device) if parts else (None, None)
        return cls(
            on_device.temperature, on_device.top_k, on_device.top_p,
            host["temperature"], host["top_k"], host["top_p"], seeds, logprobs, index, value, counted,
        )  # fmt: skip

    def count(self, sampled: Sampled) -> None:
        """Adds each drawn token to its completion's counts, for the rows with penalties whose logits were finite."""
        for row, counts in self.counted:
            if sampled.finite[row]:
                counts[int(sampled.tokens[row])] += 1


def penalties(counts: Counter, presence: float, frequency: float) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a completion generated, and what its penalties add to their logits.

    With c[t] the count of token t: `-(presence * (c[t] > 0) + frequency * c[t])`,
    OpenAI's formula; tokens never generated are not listed (they get 0).
    """
    tokens = np.fromiter(counts.keys(), np.int64, len(counts))
    n = np.fromiter(counts.values(), np.float64, len(counts))
    return tokens, -(presence + frequency * n)


def sum_by_token(*adjustments: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, values) pairs of arrays as one, each token once with the sum of its values."""
    tokens = np.concatenate([t for t, _ in adjustments])
    values = np.concatenate([v for _, v in adjustments])
    tokens, where = np.unique(tokens, return_inverse=True)
    return tokens, np.bincount(where, weights=values, minlength=len(tokens))


def logit_adjustment(
    parts: list[tuple[int, np.ndarray, np.ndarray]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's additive adjustment of the logits: (row, token) pairs [2, N] int64 and values [N] float32.

    `parts` holds (row, token ids, values) per adjusted row, each token of a
    row once, so every logit changes by exactly one addition (no
    accumulation whose order could vary).
    """
    rows = np.repeat(np.array([row for row, _, _ in parts], dtype=np.int64), [len(t) for _, t, _ in parts])
    index = np.stack([rows, np.concatenate([t for _, t, _ in parts])])
    values = np.concatenate([v for _, _, v in parts]).astype(np.float32)
    return torch.from_numpy(index).to(device), torch.from_numpy(values).to(device)


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


@dataclass
class Sampled:
    """What the sampler drew for a step's sampled rows."""

    tokens: np.ndarray  # [S] int32
    logprobs: dict[int, dict[int, float]]  # row -> {token id: logprob}, for rows that asked
    finite: np.ndarray  # [S] bool: False where the row's logits held a NaN or an infinity (its token is meaningless)
    # per prompt row of the step (prompt_logprobs): {token id: logprob} for the prompt's next token and the top ones
    prompt_logprobs: list[Optional[dict[int, float]]] = field(default_factory=list)


class Sampler:
    """Samples one token per row, never an id at or above `vocab_limit`."""

    def __init__(self, vocab_limit: int, generator: torch.Generator):
        self.vocab_limit = vocab_limit
        self.generator = generator
        self._seeded = torch.Generator(device=generator.device)  # reseeded for each seeded row

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, inputs: SamplingInputs) -> Sampled:
        """Tokens [S] int32 in host memory, {row: {token id: logprob}} for rows that asked, which rows were finite.

        Tokens are drawn from the logits plus the inputs' adjustment
        (penalties, logit bias); logprobs are those of the logits as given.
        """
        logits = logits[:, : self.vocab_limit].float()  # [S, vocab_limit]
        finite = torch.isfinite(logits).all(dim=-1)
        scores = logits
        if inputs.adjust_index is not None:  # out of place: the logprobs are read from `logits`
            rows, cols = inputs.adjust_index
            scores = logits.index_put((rows, cols), logits[rows, cols] + inputs.adjust_value)
        tokens = scores.argmax(dim=-1)
        probs = None
        if (inputs.host_temperature > 0).any():
            temperature = torch.where(inputs.temperature > 0, inputs.temperature, 1.0)
            if (inputs.host_top_k > 0).any() or (inputs.host_top_p < 1.0).any():
                probs = filtered_probs(scores, temperature, inputs.top_k, inputs.top_p)
            else:
                probs = (scores / temperature[:, None]).softmax(dim=-1)
            noise = exponential_noise(probs, self.generator, self._seeded, inputs.seeds)
            tokens = torch.where(inputs.temperature > 0, (probs / noise).argmax(dim=-1), tokens)
            if inputs.proposals is not None:
                self._verify(tokens, probs, inputs)
        # One device-to-host copy for both: the tokens, and whether each row's logits were finite.
        host = torch.stack([tokens.to(torch.int32), finite.to(torch.int32)]).cpu().numpy()
        host_tokens, host_finite = np.ascontiguousarray(host[0]), host[1].astype(bool)
        lp_rows = {row: k for row, k in inputs.logprobs.items() if host_finite[row]}
        return Sampled(host_tokens, self._logprobs(logits, host_tokens, lp_rows), host_finite)

    def _verify(self, tokens: torch.Tensor, probs: torch.Tensor, inputs: SamplingInputs) -> None:
        """Rejection sampling of a draft's proposals on the sampled rows that check them (Leviathan et al. 2023).

        A proposal x drawn from the draft's q is kept with probability
        min(1, p(x) / q(x)), p the target's distribution at its row; otherwise
        the row draws from max(0, p - q), normalised, which never gives x.
        Either way the row's token is distributed as p. Greedy rows keep the
        target's argmax: the scheduler keeps a proposal only where it equals
        the row's token, which is exact for both.
        """
        prop = inputs.proposals
        which = np.flatnonzero(inputs.host_temperature[prop.rows] > 0)
        if not len(which):
            return
        device = tokens.device
        at = torch.as_tensor(which, device=device)
        rows = prop.rows[which]
        r = torch.as_tensor(rows, device=device)
        x = prop.tokens[at]
        p, q = probs[r], prop.probs[at]
        px, qx = p.gather(1, x[:, None])[:, 0], q.gather(1, x[:, None])[:, 0]
        seeded = {j: inputs.seeds[row] for j, row in enumerate(rows.tolist()) if row in inputs.seeds}
        u = torch.rand(len(rows), generator=self.generator, device=device)
        for j, seed in seeded.items():
            u[j] = torch.rand((), generator=self._seeded.manual_seed(seed ^ VERIFY_SEED_SALT), device=device)
        noise = exponential_noise(
            p, self.generator, self._seeded, {j: seed ^ RESIDUAL_SEED_SALT for j, seed in seeded.items()}
        )
        residual = (p - q).clamp_(min=0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(torch.float32).tiny), p)
        keep = u * qx < px
        tokens[r] = torch.where(keep, x, (residual / noise).argmax(dim=-1))

    @torch.inference_mode()
    def score(self, logits: torch.Tensor, tokens: np.ndarray, top: list[int]) -> list[dict[int, float]]:
        """Per row of `logits` [R, vocab]: the logprobs of `tokens[r]` and of the `top[r]` most likely tokens.

        Prompt positions are scored this way: `tokens[r]` is the prompt token
        that follows row r's position.
        """
        if not len(top):
            return []
        return token_logprobs(logits[:, : self.vocab_limit].float(), tokens, top)

    def _logprobs(
        self, logits: torch.Tensor, tokens: np.ndarray, wanted: dict[int, int]
    ) -> dict[int, dict[int, float]]:
        if not wanted:
            return {}
        rows = list(wanted)
        return dict(zip(rows, token_logprobs(logits[rows], tokens[rows], list(wanted.values()))))


def token_logprobs(logits: torch.Tensor, tokens: np.ndarray, top: list[int]) -> list[dict[int, float]]:
    """Per row of `logits` [R, V] float32: {token id: logprob} for its `top[r]` most likely tokens and `tokens[r]`."""
    lp = logits.log_softmax(dim=-1)
    k = max(top)
    top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    chosen = torch.as_tensor(np.asarray(tokens), device=lp.device, dtype=torch.long)
    chosen_v = lp.gather(1, chosen[:, None])[:, 0].tolist()
    top_v, top_i = top_v.tolist(), top_i.tolist()
    out = []
    for j, n in enumerate(top):
        d = dict(zip(top_i[j][:n], top_v[j][:n]))
        d[int(tokens[j])] = chosen_v[j]
        out.append(d)
    return out
