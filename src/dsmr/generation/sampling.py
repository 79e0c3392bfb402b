"""Sampling: the options of a generation (`SamplingConfig`, checked once here for the CLI, the app and the
Python API), the events never drawn (`banned_mask`, pitch ranges), and one draw per lane (`sample_next`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from dsmr.errors import DsmrError
from dsmr.generation import defaults
from dsmr.generation.note_guard import check_guard_options


@dataclass
class SamplingConfig:
    temperature: float = 1.0       # 0: greedy (always the most likely event)
    top_k: int = 0                 # keep the k most likely events (0: all)
    top_p: float = 1.0             # keep the smallest set of events whose probability reaches p
    seed: Optional[int] = None     # None: a fresh random seed (reported in the result)
    max_tokens: Optional[int] = 2048   # new events after the prompt (None: no limit)
    max_seconds: Optional[float] = None  # stop once the piece (prompt included) is this long
    stop_at_eos: bool = True       # False: EOS is banned and the piece goes on until a limit
    banned_ids: Sequence[int] = ()  # events never sampled (BOS and PAD never are)
    # the note guard (dsmr.generation.note_guard; encodings with NOTE_OFF events): no note longer than this, no more
    # notes sounding at once than that; either one turns the guard on
    max_note_seconds: Optional[float] = None
    max_polyphony: Optional[int] = None

    @property
    def guards_notes(self) -> bool:
        return self.max_note_seconds is not None or self.max_polyphony is not None

    def validate(self, vocab_size: Optional[int] = None) -> None:
        problems = []
        if not 0 <= self.temperature <= defaults.MAX_TEMPERATURE:  # the bound of the CLI and the page too
            problems.append(f"temperature must be in [0, {defaults.MAX_TEMPERATURE:g}], got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            problems.append(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.max_tokens is None and self.max_seconds is None:
            problems.append("give max_tokens or max_seconds (or both): a piece needs a limit")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            problems.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        problems += check_guard_options(self.max_note_seconds, self.max_polyphony)
        if vocab_size is not None:
            bad = [i for i in self.banned_ids if not 0 <= int(i) < vocab_size]
            if bad:
                problems.append(f"banned ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        if problems:
            raise DsmrError("sampling: " + "; ".join(problems))


def banned_mask(tokenizer, sampling: SamplingConfig, device=None) -> Tensor:
    """Bool [vocab] of events that are never sampled: PAD, BOS, the banned ids, EOS when ignored."""
    mask = torch.zeros(tokenizer.vocab_size, dtype=torch.bool, device=device)
    banned = [tokenizer.pad_id, tokenizer.bos_id, *map(int, sampling.banned_ids)]
    if not sampling.stop_at_eos:
        banned.append(tokenizer.eos_id)
    mask[banned] = True
    if bool(mask.all()):
        raise DsmrError("sampling: every event is banned, nothing can be generated")
    return mask


def pitch_range_bans(tokenizer, min_pitch: int = 0, max_pitch: int = 127) -> list[int]:
    """Ids of the note-starting events whose pitch lies outside [min_pitch, max_pitch]."""
    if not 0 <= min_pitch <= max_pitch <= 127:
        raise DsmrError(f"pitch range: need 0 <= min pitch <= max pitch <= 127, got {min_pitch}..{max_pitch}")
    banned, seen = [], 0
    for i in range(tokenizer.vocab_size):
        pitch = tokenizer.note_pitch(i)
        if pitch is not None:
            seen += 1
            if not min_pitch <= pitch <= max_pitch:
                banned.append(i)
    if not seen:
        raise DsmrError(f"pitch range: {tokenizer!r} has no NOTE_ON/Pitch events to restrict")
    if len(banned) == seen:
        raise DsmrError(f"pitch range {min_pitch}..{max_pitch} excludes every pitch the tokenizer can play")
    return banned


def pitch_bans(tokenizer, min_pitch: int, max_pitch: int) -> tuple[int, ...]:
    """The ids a pitch range bans, as `dsmr generate` and the app apply it: none for the whole range, or for an
    encoding whose ids name no pitch (nothing to restrict); otherwise pitch_range_bans'."""
    pitchless = all(tokenizer.note_pitch(i) is None for i in range(tokenizer.vocab_size))
    if (min_pitch, max_pitch) == (0, 127) or pitchless:
        return ()
    return tuple(pitch_range_bans(tokenizer, min_pitch, max_pitch))


def sample_next(logits: Tensor, sampling: SamplingConfig, generator, banned: Optional[Tensor] = None) -> Tensor:
    """One event per lane from next-token logits [B, vocab]: ban, temperature, top-k, top-p, sample.
    `generator`: one torch.Generator for all lanes, or a list of one per lane (each lane then draws
    from its own seed only)."""
    logits = logits.float()
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    if sampling.temperature != 1.0:  # the largest logit at 0 first: a tiny temperature cannot overflow
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop an event when the more likely ones already reach top_p (the most likely always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # One uniform draw per lane through the cumulative distribution: torch.multinomial costs ~50 us per call
    # on a CPU (an exponential draw per event of the vocabulary), as much as a whole decoding step
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    if not bool(torch.isfinite(cdf[:, -1]).all()):
        raise DsmrError("sampling: the model gave non-finite logits (NaN or inf); its weights are damaged or "
                        "diverged")
    cdf = cdf / cdf[:, -1:]  # ends at exactly 1 > u: the event found has a probability > 0
    if isinstance(generator, (list, tuple)):
        if len(generator) != cdf.shape[0]:
            raise DsmrError(f"sample_next: {len(generator)} generators for {cdf.shape[0]} lanes")
        u = torch.cat([torch.rand(1, 1, generator=g, device=cdf.device) for g in generator])
    else:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)
    return torch.searchsorted(cdf, u, right=True)[:, 0]
