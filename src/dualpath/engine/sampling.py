"""Token sampling on the decode engine: greedy, or temperature / top-k / top-p, deterministic per seed.

A turn carries :class:`SamplingParams` (``Turn.sampling``; ``None`` = greedy, the engine's default). The decode
engine makes one :class:`Sampler` per request when the request joins its batch; the sampler owns a private
``torch.Generator`` seeded from ``seed``, so a request's draws depend only on its own logits and seed: the same
prompt with the same seed gives the same tokens whatever else shares the batch (up to the float differences of
batched compute). Without a seed one is drawn from the OS at random.

``stop_ids``: token ids (e.g. the tokenizer's end-of-sequence) after which the request stops early; the stop
token itself is part of the output. ``min_tokens`` (vLLM's): while fewer tokens than that have been generated,
the stop ids cannot be picked (their logits are masked to ``-inf`` before any filtering), so no stop token ends
the request before ``min_tokens`` tokens. ``temperature == 0`` means greedy (``argmax``), as in the OpenAI API.

``logprobs`` (``None``: off): the sampler records each picked token's :class:`TokenLogprob`: its log-probability
under the model (the log-softmax of the raw logits, before ``min_tokens`` masking, temperature and filtering, as
vLLM and OpenAI report it) and the ``logprobs`` most likely tokens' (0 to :data:`MAX_LOGPROBS`). The decode
engine hands each to the turn's ``on_logprob`` listener before the token itself reaches ``on_token``.
``prompt_logprobs`` (``None``: off): the prefill engine records the same for every prompt token after the first
(:func:`rows_logprobs` over its forward's hidden states); such a turn is recomputed, never read from storage, since
a prompt position whose KV is loaded has no forward to take logits from.

Penalties and biases (OpenAI's and vLLM's, applied in vLLM's order before the ``min_tokens`` mask, the grammar,
temperature and filtering): ``logit_bias`` adds to the named tokens' logits; ``repetition_penalty`` (Hugging
Face's definition) divides a positive logit and multiplies a negative one of every token in the prompt or
generated so far; ``frequency_penalty`` subtracts ``penalty x count`` and ``presence_penalty`` subtracts itself
from the logit of every token generated so far. Log-probabilities stay those of the raw logits.
``allowed_ids`` (vLLM's ``allowed_token_ids``): every other token is masked. ``bad_words`` (vLLM's, as token
sequences): a one-token word is never picked; a longer one's last token is masked while the tokens generated last
equal the rest of it (so the whole word is never generated, the prompt's tokens not counted).

``grammar``: constrained decoding (:mod:`dualpath.engine.grammar`): the tokens the grammar does not allow next
are masked after the ``min_tokens`` mask; once the grammar is complete the next pick is the end-of-sequence token
(the only one allowed) and the request stops there (``Sampler.done``, even when the stop ids were dropped; also
when ``allowed_ids`` or ``bad_words`` mask that token: the grammar's answer is whole).

Masks that together leave no token to pick (``allowed_ids`` all among one-token ``bad_words``, or none of them
allowed by the grammar) raise :class:`~dualpath.errors.ModelError` naming the fields, the request's error: no
masked token is ever picked.
"""

from __future__ import annotations

import secrets
from typing import Any

import torch

from dualpath.engine.sampling_params import MAX_LOGPROBS, MAX_SEED, SamplingParams
from dualpath.errors import ModelError
from dualpath.types import TokenLogprob

__all__ = ["MAX_LOGPROBS", "MAX_SEED", "Sampler", "SamplingParams", "TokenLogprob", "filtered_probs", "rows_logprobs",
           "sample", "token_logprob"]


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The :class:`TokenLogprob` of ``token`` under one row of raw ``logits`` with its ``k`` most likely."""
    lp = torch.log_softmax(logits.detach().reshape(-1).to(torch.float32), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        vals, ids = torch.topk(lp, min(k, lp.numel()))
        top = tuple(zip((int(i) for i in ids.tolist()), (float(v) for v in vals.tolist()), strict=True))
    return TokenLogprob(int(token), float(lp[int(token)]), top)


def rows_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprob]:
    """The :class:`TokenLogprob` of ``targets[i]`` under each row ``logits[i]`` (``[rows, vocab]``), with the ``k``
    most likely tokens of the row and the target's rank (1 + the tokens strictly more likely)."""
    lp = torch.log_softmax(logits.detach().to(torch.float32), dim=-1)
    tgt = targets.to(lp.device, torch.int64).reshape(-1, 1)
    got = lp.gather(1, tgt)
    ranks = ((lp > got).sum(dim=-1) + 1).tolist()
    chosen = got.reshape(-1).tolist()
    ids = tgt.reshape(-1).tolist()
    if k > 0:
        vals, top = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        tops = [tuple(zip(t, v, strict=True)) for t, v in zip(top.tolist(), vals.tolist(), strict=True)]
    else:
        tops = [() for _ in ids]
    return [TokenLogprob(int(i), float(c), t, int(r)) for i, c, t, r in zip(ids, chosen, tops, ranks, strict=True)]


class Sampler:
    """Picks the tokens of one request (see the module docstring)."""

    def __init__(self, params: SamplingParams | None, constraint: Any = None, prompt: Any = ()) -> None:
        self.params = params or SamplingParams()
        self.counts: dict[int, int] = {}  # generated token -> times (presence / frequency penalties)
        # tokens the repetition penalty applies to: the prompt's and every generated one
        self._seen: set[int] = {int(t) for t in prompt} if self.params.repetition_penalty != 1.0 else set()
        self.constraint = constraint  # a dualpath.engine.grammar.Constraint when params.grammar is set
        self.done = False  # the grammar is complete: the request ends here
        self.generator: torch.Generator | None = None
        if not self.params.greedy:
            self.generator = torch.Generator(device="cpu")
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self.generator.manual_seed(seed)
        self.stop_ids = frozenset(int(t) for t in self.params.stop_ids)
        self._stop_index: torch.Tensor | None = None
        self.last: TokenLogprob | None = None  # the last pick's logprobs (params.logprobs set), until taken
        self._allowed: torch.Tensor | None = None  # params.allowed_ids as a mask (built at the first pick)
        self._out: list[int] = []  # the tokens generated so far (kept for params.bad_words)

    def __call__(self, logits: torch.Tensor, generated: int = 0) -> int:
        """The next token for one row of ``logits`` (shape ``[vocab]``), ``generated`` tokens having been picked
        before it (the stop ids are masked while ``generated < min_tokens``)."""
        raw = logits
        if self.params.adjusts:
            logits = self._adjust(logits)
        if generated < self.params.min_tokens and self.stop_ids:
            logits = self._mask_stops(logits)
        # a complete grammar allows only the end of the sequence: this pick is the last
        was_complete = self.constraint is not None and self.constraint.complete
        tok = self._pick(logits, generated)
        if self.constraint is not None:
            self.constraint.accept(tok)
            self.done = was_complete
        if self.params.logprobs is not None:
            self.last = token_logprob(raw, tok, self.params.logprobs)
        if self.params.adjusts:
            self.counts[tok] = self.counts.get(tok, 0) + 1
            if self.params.repetition_penalty != 1.0:
                self._seen.add(tok)
            if self.params.bad_words:
                self._out.append(tok)
        return tok

    def _pick(self, logits: torch.Tensor, generated: int) -> int:
        """Greedy or sampled, among the tokens the grammar allows. A greedy pick the grammar allows is the argmax
        itself: it needs no mask (the same token, at a fraction of the cost). Masks that leave no token at all
        are :meth:`_nothing_left`, never a pick of a masked token."""
        c = self.constraint
        flat = logits.reshape(-1)
        if self.generator is None:
            best = int(torch.argmax(flat))
            if c is not None and flat[best] > float("-inf") and not c.allows(best):
                flat = c.mask(flat)
                best = int(torch.argmax(flat))
            return best if flat[best] > float("-inf") else self._nothing_left(generated)
        if c is not None:
            flat = c.mask(flat)
        if not flat.max() > float("-inf"):
            return self._nothing_left(generated)
        return sample(flat, self.params, self.generator)

    def _nothing_left(self, generated: int) -> int:
        """No token survives the request's masks. A complete grammar's answer ends here (its end-of-sequence token,
        the only one it allows next, was masked by ``allowed_ids`` or ``bad_words``); anything else is the
        request's error, named."""
        c = self.constraint
        if c is not None and c.complete and c.eos is not None:
            return c.eos
        p = self.params
        named = [name for name, on in (("allowed_token_ids", p.allowed_ids), ("bad_words", p.bad_words),
                                       ("min_tokens", generated < p.min_tokens and bool(self.stop_ids)),
                                       ("the grammar (response_format, tools or guided_*)", c is not None)) if on]
        raise ModelError(f"no token can be picked for token {generated + 1} of the answer: "
                         f"{', '.join(named) or 'the masks'} exclude every token")

    def _adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after ``logit_bias``, then the repetition, frequency and presence penalties (vLLM's order
        and definitions: OpenAI's for the last two, Hugging Face's for the repetition penalty)."""
        p = self.params
        x = logits.detach().reshape(-1).to(torch.float32).clone()
        n = x.numel()
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias if t < n], dtype=torch.long)
            vals = torch.tensor([b for t, b in p.logit_bias if t < n], dtype=torch.float32)
            x.index_add_(0, ids.to(x.device), vals.to(x.device))
        if p.repetition_penalty != 1.0 and self._seen:
            ids = torch.tensor(sorted(t for t in self._seen if t < n), dtype=torch.long, device=x.device)
            sel = x[ids]
            x[ids] = torch.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and self.counts:
            ids = torch.tensor([t for t in self.counts if t < n], dtype=torch.long, device=x.device)
            cnt = torch.tensor([self.counts[t] for t in self.counts if t < n], dtype=torch.float32, device=x.device)
            x[ids] -= p.frequency_penalty * cnt + p.presence_penalty
        if p.allowed_ids:
            if self._allowed is None or self._allowed.numel() != n or self._allowed.device != x.device:
                keep = torch.tensor([t for t in p.allowed_ids if t < n], dtype=torch.long, device=x.device)
                self._allowed = torch.ones(n, dtype=torch.bool, device=x.device).index_fill_(0, keep, False)
            x = x.masked_fill(self._allowed, float("-inf"))
        if p.bad_words:
            out = self._out
            banned = [w[-1] for w in p.bad_words
                      if w[-1] < n and (len(w) == 1 or (len(out) >= len(w) - 1 and tuple(out[len(out) - len(w) + 1:])
                                                        == w[:-1]))]
            if banned:
                x[torch.tensor(banned, dtype=torch.long, device=x.device)] = float("-inf")
        return x

    def take(self) -> TokenLogprob | None:
        """The last pick's :class:`TokenLogprob` (None when not recorded), once."""
        got, self.last = self.last, None
        return got

    def _mask_stops(self, logits: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1)
        if self._stop_index is None or self._stop_index.device != flat.device:
            ids = sorted(t for t in self.stop_ids if t < flat.numel())
            self._stop_index = torch.tensor(ids, dtype=torch.long, device=flat.device)
        return flat.index_fill(0, self._stop_index, float("-inf"))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p (nucleus) and min-p filtering, in that order (as Hugging
    Face's and vLLM's samplers apply them); float32 on the CPU."""
    x = logits.detach().to("cpu", torch.float32).reshape(-1) / params.temperature
    vocab = x.numel()
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above each one
        drop = before >= params.top_p  # the most likely token always survives (before = 0)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs = probs / probs.sum()
    if params.min_p > 0.0:  # (relative to the most likely token, which always survives)
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One draw from :func:`filtered_probs` with ``generator``."""
    probs = filtered_probs(logits, params)
    return int(torch.multinomial(probs, 1, generator=generator).item())
