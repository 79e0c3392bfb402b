"""Generating pieces: BOS, an optional prompt, then sampled events until EOS or a limit, for one sample
(`generate`) or many continuations of one prompt as lanes of one decoder (`generate_batch`), with what each
sample is (`GenerationResult`)."""

from __future__ import annotations

import copy
import os
import time
from array import array
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dsmr.errors import DsmrError
from dsmr.generation.decoder import IncrementalDecoder, compile_available
from dsmr.generation.precision import decoding_state_dtype
from dsmr.generation.prompts import MusicClock
from dsmr.generation.sampling import SamplingConfig, banned_mask, sample_next
from dsmr.generation.note_guard import LengthGuard, NoteGuard, make_guard


@dataclass
class GenerationResult:
    ids: np.ndarray              # events of the piece: prompt then continuation (no BOS/EOS)
    prompt_tokens: int
    new_tokens: int
    prompt_seconds: float
    music_seconds: float         # whole piece, prompt included
    stop_reason: str             # "eos" | "max_tokens" | "max_seconds" | "interrupted" (Ctrl-C)
    wall_seconds: float          # prompt + sampling (of the whole batch: lanes run together)
    prefill_seconds: float       # the prompt alone
    sampling_cpu_seconds: float  # CPU time of this process while sampling (prompt excluded)
    state_bytes: int             # the decoder's key/value buffers (constant; all lanes)
    peak_memory_bytes: int
    memory_method: str
    seed: int
    warmup_seconds: float = 0.0  # compiling / first run of the decoding step, before the clock starts
    num_samples: int = 1         # lanes sampled together (this result is one of them)
    sample_index: int = 0
    compiled: bool = False       # the decoding step ran compiled (torch.compile)
    decoding_step: str = "eager"  # IncrementalDecoder.step_kind: "fused", "compiled" or "eager"
    new_notes: int = 0           # notes started after the prompt (0: nothing new to hear)
    guard_forced: int = 0        # draws where the note guard allowed only note-offs (all lanes of the batch)

    @property
    def warning(self) -> Optional[str]:
        """What a user should be told about this sample: nothing new to hear."""
        if self.new_notes == 0:
            how = "the model ended the piece at once" if self.stop_reason == "eos" else "no note was started"
            return (f"no new notes after the prompt ({how}; {self.new_tokens} new events, stopped at "
                    f"{self.stop_reason.replace('_', ' ')}): try another seed"
                    + (", or generate to the length asked without stopping at the end-of-piece event"
                       if self.stop_reason == "eos" else ""))
        return None

    @property
    def tokens_per_s(self) -> float:
        """New events of this sample per second of sampling (prompt excluded)."""
        return self.new_tokens / max(self.wall_seconds - self.prefill_seconds, 1e-9)

    @property
    def realtime_factor(self) -> float:
        """Seconds of new music per second of sampling."""
        return (self.music_seconds - self.prompt_seconds) / max(self.wall_seconds - self.prefill_seconds, 1e-9)

    def summary(self) -> dict:
        return {
            "tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens,
            "music_seconds": round(self.music_seconds, 3), "prompt_seconds": round(self.prompt_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3), "tokens_per_s": round(self.tokens_per_s, 1),
            "realtime_factor": round(self.realtime_factor, 2), "state_bytes": self.state_bytes,
            "peak_memory_bytes": self.peak_memory_bytes, "memory_method": self.memory_method,
            "stop_reason": self.stop_reason, "seed": self.seed,
            "prefill_seconds": round(self.prefill_seconds, 3), "warmup_seconds": round(self.warmup_seconds, 3),
            "compiled": self.compiled, "decoding_step": self.decoding_step, "new_notes": self.new_notes,
            "guard_forced": self.guard_forced, "warning": self.warning,
        }


def batch_summary(results: Sequence[GenerationResult]) -> dict:
    """Figures of samples generated together: total new events per second of sampling (all lanes) and
    the per-sample mean."""
    first = results[0]
    sampling_s = max(first.wall_seconds - first.prefill_seconds, 1e-9)
    total = sum(r.new_tokens for r in results)
    return {"num_samples": len(results), "tokens": total, "tokens_per_s": round(total / sampling_s, 1),
            "tokens_per_s_per_sample": round(total / sampling_s / len(results), 1),
            "wall_seconds": round(first.wall_seconds, 3), "prefill_seconds": round(first.prefill_seconds, 3),
            "warmup_seconds": round(first.warmup_seconds, 3), "state_bytes": first.state_bytes,
            "peak_memory_bytes": first.peak_memory_bytes, "compiled": first.compiled,
            "decoding_step": first.decoding_step,
            "seeds": [r.seed for r in results]}


def generate(model, *args, **kwargs) -> GenerationResult:
    """Sample one piece: BOS, the prompt's events, then new events until EOS or a limit.

        generate(model, prompt_ids=None, sampling=SamplingConfig(), progress=True, compile=False, fused=True)

    `model` comes from `dsmr.load_model` and brings its tokenizer and segment length (a model built in code
    takes `tokenizer=` and `segment_len=`). Runs where the model is; the model is put in eval mode. The same
    seed on the same device gives the same piece. `compile`: True compiles the decoding step (paid once per
    process, `warmup_seconds`), "auto" where `compile_available`. `fused`: dsmr.backends.cpu.kernels'
    whole-step op where it can run the model (`IncrementalDecoder`); it then replaces the compiled step.
    The older `generate(model, tokenizer, segment_len, prompt_ids, ...)` still works, with a warning.
    """
    tokenizer, segment_len, given = _model_parts(model, args, kwargs, "generate", _ONE)
    return _generate_batch(model, tokenizer, segment_len, num_samples=1, **given)[0]


def generate_batch(model, *args, **kwargs) -> list[GenerationResult]:
    """Sample `num_samples` continuations of one prompt together, as lanes of one decoder:

        generate_batch(model, prompt_ids=None, sampling=SamplingConfig(), num_samples=1, progress=True,
                       compile=False, fused=True)

    The prompt is fed once, each lane draws from its own seed (`sampling.seed + i`, recorded in its result)
    and stops at its own EOS or limit; the batch ends when every lane has stopped. Lanes that stopped keep
    running (their events are discarded) until the last one ends. The same seed and `num_samples` on the
    same device give the same pieces. `model`, `tokenizer=`, `segment_len=` as in `generate`.
    """
    tokenizer, segment_len, given = _model_parts(model, args, kwargs, "generate_batch", _BATCH)
    return _generate_batch(model, tokenizer, segment_len, **given)


# the parameters after the model, in order
_ONE = ("prompt_ids", "sampling", "progress", "compile", "fused")
_BATCH = ("prompt_ids", "sampling", "num_samples", "progress", "compile", "fused")


def _model_parts(model, args: tuple, kwargs: dict, name: str, order: tuple) -> tuple:
    """(tokenizer, segment_len, the other arguments by name): the model's own unless given; the older
    positional form `(model, tokenizer, segment_len, ...)` is taken with a DeprecationWarning."""
    import warnings

    tokenizer, segment_len = kwargs.pop("tokenizer", None), kwargs.pop("segment_len", None)
    if args and hasattr(args[0], "vocab_size") and hasattr(args[0], "decode"):  # a tokenizer: the older form
        warnings.warn(f"{name}(model, tokenizer, segment_len, ...) is deprecated: the model brings both "
                      f"(dsmr.load_model), or give tokenizer= and segment_len=", DeprecationWarning, stacklevel=3)
        tokenizer, args = args[0], args[1:]
        if args:
            segment_len, args = args[0], args[1:]
    if len(args) > len(order):
        raise TypeError(f"{name}() takes at most {len(order) + 1} positional arguments")
    for key, value in zip(order, args):
        if key in kwargs:
            raise TypeError(f"{name}() got multiple values for argument {key!r}")
        kwargs[key] = value
    unknown = set(kwargs) - set(order)
    if unknown:
        raise TypeError(f"{name}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    segment_len = segment_len if segment_len is not None else getattr(model, "segment_len", None)
    if tokenizer is None or segment_len is None:
        raise DsmrError(f"{name}: the model has no tokenizer or segment length (a model from dsmr.load_model "
                        f"has both); give tokenizer= and segment_len=")
    return tokenizer, segment_len, kwargs


def _generate_batch(model, tokenizer, segment_len: int, prompt_ids: Optional[Sequence[int]] = None,
                    sampling: SamplingConfig = SamplingConfig(), num_samples: int = 1, progress: bool = True,
                    compile=False, fused: bool = True) -> list[GenerationResult]:
    from dsmr.core.runtime import PeakMemory

    prompt = _checked_prompt(model, tokenizer, prompt_ids, sampling, num_samples)
    device = model.embedding.weight.device
    if compile == "auto":
        compile = compile_available(device)
    model.eval()
    B = num_samples
    base = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(7), "little")
    seeds = [(base + i) % 2**63 for i in range(B)]
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    banned = banned_mask(tokenizer, sampling, device=device)[None]
    lanes = _Lanes(tokenizer, sampling, prompt, B, progress)
    guard = make_guard(tokenizer, B, sampling.max_note_seconds, sampling.max_polyphony, device=device)
    if guard is not None:
        guard.feed(prompt.tolist())
    with PeakMemory(device) as meter, torch.inference_mode():
        decoder = IncrementalDecoder(model, segment_len, batch_size=B, device=device, compile=bool(compile),
                                     state_dtype=decoding_state_dtype(model, bool(compile)), fused=fused)
        warmup = decoder.warm_up()  # compiles the step once; not part of the timed generation
        start = time.perf_counter()
        logits = _prefill(decoder, tokenizer, prompt)
        prefill = time.perf_counter() - start
        cpu_start = time.process_time()
        _sample_lanes(decoder, logits, lanes, sampling, generators[0] if B == 1 else generators, banned, guard)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    lanes.close_bar()
    timing = dict(wall_seconds=wall, prefill_seconds=prefill, sampling_cpu_seconds=cpu, warmup_seconds=warmup,
                  state_bytes=decoder.state_bytes(), peak_memory_bytes=meter.peak_bytes,
                  memory_method=meter.method, compiled=decoder.compiled, decoding_step=decoder.step_kind,
                  guard_forced=guard.forced_events if guard is not None else 0)
    return [lanes.result(i, seeds[i], timing) for i in range(B)]


def _checked_prompt(model, tokenizer, prompt_ids, sampling: SamplingConfig, num_samples) -> np.ndarray:
    """The prompt as an int64 array, after checking the model, tokenizer, sampling and batch size agree."""
    if model.cfg.vocab_size != tokenizer.vocab_size:
        raise DsmrError(f"model vocabulary {model.cfg.vocab_size} != tokenizer vocabulary {tokenizer.vocab_size}: "
                        f"use the tokenizer the model was trained with")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise DsmrError(f"num_samples must be a positive integer, got {num_samples!r}")
    sampling.validate(tokenizer.vocab_size)
    prompt = np.asarray([] if prompt_ids is None else prompt_ids, dtype=np.int64)
    if prompt.ndim != 1 or (prompt.size and (prompt.min() < 0 or prompt.max() >= tokenizer.vocab_size)):
        raise DsmrError(f"prompt ids must be a flat sequence of ids in [0, {tokenizer.vocab_size})")
    return prompt


def _prefill(decoder: "IncrementalDecoder", tokenizer, prompt: np.ndarray) -> Tensor:
    """Feed BOS and the prompt into every lane of `decoder`; returns the next-event logits [B, vocab]. With
    several lanes the prompt runs once through a one-lane decoder, then is copied into every lane."""
    first = torch.tensor([[tokenizer.bos_id, *prompt.tolist()]], dtype=torch.long, device=decoder.device)
    if decoder.batch_size == 1:
        return decoder.feed(first, last_only=True)
    one = IncrementalDecoder(decoder.model, decoder.segment_len, batch_size=1, device=decoder.device,
                             state_dtype=decoder.state_dtype)  # the same rounding as one lane fed alone
    logits = one.feed(first, last_only=True).expand(decoder.batch_size, -1)
    decoder.load_lane(one)
    return logits


def _sample_lanes(decoder: "IncrementalDecoder", logits: Tensor, lanes: "_Lanes", sampling: SamplingConfig,
                  generator, banned: Tensor, guard: Optional[NoteGuard | LengthGuard] = None) -> None:
    """Sample, record and step until every lane has stopped (or Ctrl-C: the live lanes stop 'interrupted')."""
    step_input = torch.zeros(decoder.batch_size, dtype=torch.long, device=decoder.device)
    try:
        while True:
            ban = banned
            if guard is not None:
                ban = banned | guard.banned()
                stuck = ban.all(dim=-1, keepdim=True)  # the user's bans and the guard's leave nothing
                ban = torch.where(stuck, banned, ban)
            tokens = sample_next(logits, sampling, generator, ban)
            if guard is not None:
                guard.update(tokens)
            if lanes.record(tokens.tolist()) == 0:
                return
            step_input.copy_(tokens)
            logits = decoder.step(step_input)
    except KeyboardInterrupt:  # keep what was generated so far; the caller writes it
        lanes.interrupt()


class _Lanes:
    """What each lane of a batch has written: its events (8 bytes each: all that grows), its music clock,
    its count of new events and why it stopped; and the progress bar of the batch."""

    def __init__(self, tokenizer, sampling: SamplingConfig, prompt: np.ndarray, num_samples: int, progress: bool):
        self.tokenizer, self.sampling, self.prompt = tokenizer, sampling, prompt
        self.pieces = [array("q", prompt.tolist()) for _ in range(num_samples)]
        clock = MusicClock(tokenizer, self.pieces[0])
        self.clocks = [clock] + [copy.copy(clock) for _ in range(num_samples - 1)]
        self.prompt_seconds = clock.seconds
        self.stop: list[Optional[str]] = [None] * num_samples
        self.new = [0] * num_samples
        self.live = num_samples
        self.bar = _progress_bar(progress, sampling, self.prompt_seconds, num_samples)
        self.starts_note = np.array([tokenizer.note_pitch(i) is not None for i in range(tokenizer.vocab_size)])

    def record(self, tokens: list[int]) -> int:
        """Append each live lane's sampled event, stop the lanes that reach EOS or a limit; returns how
        many lanes are still live."""
        limit_tokens, max_seconds = self.sampling.max_tokens, self.sampling.max_seconds
        for i, token in enumerate(tokens):
            if self.stop[i] is not None:
                continue
            if token == self.tokenizer.eos_id:  # only reachable with stop_at_eos (else EOS is banned)
                self.stop[i], self.live = "eos", self.live - 1
                continue
            self.pieces[i].append(token)
            self.new[i] += 1
            before = self.clocks[i].seconds
            seconds = self.clocks[i].add(token, self.pieces[i])
            if self.bar is not None:
                self._advance_bar(i, before, seconds)
            if limit_tokens is not None and self.new[i] >= limit_tokens:
                self.stop[i], self.live = "max_tokens", self.live - 1
            elif max_seconds is not None and seconds >= max_seconds:
                self.stop[i], self.live = "max_seconds", self.live - 1
        return self.live

    def _advance_bar(self, lane: int, before: float, seconds: float) -> None:
        bar, limit_tokens = self.bar, self.sampling.max_tokens
        if limit_tokens is not None or len(self.pieces) > 1:
            bar.update(1)
        else:  # the bar counts seconds of music; never past its total
            bar.update(min(seconds, bar.total) - min(before, bar.total))
        if lane == 0 and self.new[0] % 64 == 0:
            bar.set_postfix_str(_postfix(self.new[0], seconds, limit_tokens), refresh=False)

    def interrupt(self) -> None:
        self.stop = [s if s is not None else "interrupted" for s in self.stop]

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(_postfix(self.new[0], self.clocks[0].seconds, self.sampling.max_tokens))
            self.bar.close()

    def result(self, i: int, seed: int, timing: dict) -> GenerationResult:
        out = np.frombuffer(self.pieces[i], dtype=np.int64).copy()
        timing = dict(timing, new_notes=int(self.starts_note[out[self.prompt.size:]].sum()))
        return GenerationResult(
            ids=out, prompt_tokens=int(self.prompt.size), new_tokens=self.new[i],
            prompt_seconds=self.prompt_seconds, music_seconds=float(self.tokenizer.seconds(out)) if out.size else 0.0,
            stop_reason=self.stop[i], seed=seed, num_samples=len(self.pieces), sample_index=i, **timing)


def _progress_bar(progress: bool, sampling: SamplingConfig, prompt_seconds: float, num_samples: int = 1):
    if not progress:
        return None
    from tqdm import tqdm

    if num_samples > 1:  # events of all lanes
        total = sampling.max_tokens * num_samples if sampling.max_tokens is not None else None
        return tqdm(total=total, unit="tok", desc=f"generating {num_samples}", dynamic_ncols=True)
    if sampling.max_tokens is not None:
        return tqdm(total=sampling.max_tokens, unit="tok", desc="generating", dynamic_ncols=True)
    # Only a duration limit: the bar counts seconds of music.
    return tqdm(total=round(sampling.max_seconds, 2), initial=round(min(prompt_seconds, sampling.max_seconds), 2),
                unit="s", desc="generating", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s of music [{elapsed}{postfix}]")


def _postfix(tokens: int, seconds: float, limit_tokens: Optional[int]) -> str:
    return f"{seconds:.1f} s of music" if limit_tokens is not None else f"{tokens} tokens"
