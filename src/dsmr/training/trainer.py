"""The full-piece streaming trainer (docs/design.md).

Lanes stream whole training pieces segment by segment (dsmr.data.stream.PieceStream); the recurrent state is
carried from segment to segment, detached, and one optimizer step is taken per segment batch (or per
`grad_accum` of them: the state is still carried per segment). The loss is the mean NLL over the real
targets of the step, plus `gate_lambda * gate_penalty` when the model has gates.

The full-attention reference (`baseline="excerpt"`) is the same network with no memory, trained on
fixed-length excerpts of `context` tokens (dsmr.data.stream.ExcerptStream) and evaluated on full pieces in
non-overlapping windows of `context` tokens.

The options are dsmr.training.config.TrainConfig. `Trainer` is one run in named steps: set-up, resume, one
optimization step, logging, validation, save, finish; `Trainer.run` is the loop. The run folder, its
resume checks and the RNG capture belong to dsmr.training.resume: config.json, model.safetensors +
trainer_state.pt (latest, exactly resumable: optimizer, LR schedule, RNG states, stream position,
recurrent state), best.safetensors; the log (metrics.jsonl, and TensorBoard logs in tb/ when the
tensorboard package is installed) to dsmr.training.run_log.

Ctrl-C: the first one finishes the current step, saves a resumable checkpoint and returns
(`interrupted: True`); a KeyboardInterrupt raised inside a step (a second Ctrl-C, or a library caller's)
rewinds to the last finished step and saves that.

Several processes (torchrun, see dsmr.training.distributed and docs/distributed.md): DistributedDataParallel over
one shared lane assignment; rank 0 writes; the checkpoint holds every rank's recurrent state and RNG.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dsmr.sharing.run_folder import MAX_ABS_WEIGHT, METRICS_FILE, TENSORBOARD_DIR, TRAINER_STATE_FILE, check_tokenizer
from dsmr.training.resume import check_optimizer_state, prepare_run, remove_run_temporaries, resume_weights, rng_state, save_checkpoint, set_rng_state
from dsmr.training.distributed import DistContext, init_distributed, reduce_evaluation, split_pieces, wrap_model
from dsmr.errors import DsmrError
from dsmr.evaluation.perplexity import NLL_BUCKETS, evaluate
from dsmr.model.losses import token_nll
from dsmr.model.network import DSMR
from dsmr.model.memory import state_from_cpu, state_to_cpu
from dsmr.sharing.loader import load_model
from dsmr.training.run_lock import run_folder_writer
from dsmr.training.run_log import MetricsLog
from dsmr.core.runtime import PeakMemory, autocast, resolve_device, state_bytes
from dsmr.training.config import TrainConfig, make_model_config, run_config
from dsmr.training.optimization import lr_factor, horizons_at, make_optimizer, TrainingDiverged, TrainStep, _to_device
from dsmr.training.inputs import _val_pieces, training_stream, total_steps, _seed_everything, _StopRequest
from dsmr.training.state import Interval, TrainerState


def train(cfg: TrainConfig, cache, out_dir, progress: bool = True, resume: bool = False) -> dict:
    """Train a DSMR model on the train split of `cache` (a TokenCache) into the run folder `out_dir`.

    Returns the final validation result of dsmr.evaluation.perplexity.evaluate (ppl, nll, tokens, pieces, tokens_per_s,
    peak_memory_bytes, state_bytes, nll_by_position; None values when the cache has no validation
    pieces) plus steps, epoch, train_loss (mean NLL of the last logged interval), train_tokens_per_s,
    train_peak_memory_bytes, train_state_bytes, best_val_nll, interrupted, world_size and run_dir.

    Under torchrun (or in a process group the caller initialized) every process calls this with the same
    arguments; each trains its share of the lanes (dsmr.training.distributed) and all return the same result.
    """
    cfg.validate()
    ctx = init_distributed(resolve_device(cfg.device))
    finished = False
    try:
        with contextlib.ExitStack() as stack:  # rank 0 writes the run folder, and holds it for the whole run
            ctx.from_main(lambda: stack.enter_context(run_folder_writer(out_dir, create=not resume)) and None)
            result = Trainer(cfg, cache, Path(out_dir), ctx, progress, resume).run()
        finished = True
        return result
    finally:
        ctx.close(finished)


class Trainer:
    """One training run in named steps: set-up (`__init__`), `resume`, `optimization_step`, `log_interval`,
    `validate`, `save_latest`, `finish`. `run` is the loop. Every process of a distributed run makes one."""

    def __init__(self, cfg: TrainConfig, cache, run_dir: Path, ctx: DistContext, progress: bool, resume: bool):
        self.cfg, self.run_dir, self.ctx, self.progress = cfg, run_dir, ctx, progress
        self.device, self.main = ctx.device, ctx.is_main
        self.use_amp = cfg.amp and self.device.type == "cuda"
        tokenizer = cache.tokenizer
        if "train" not in cache.splits or cache.num_pieces("train") == 0:
            raise DsmrError(f"the cache {cache.path} has no training pieces")
        train_pieces = cache.pieces("train")
        self.val_pieces = _val_pieces(cfg, cache)
        self.model_cfg = make_model_config(cfg, tokenizer.vocab_size)
        self.config = run_config(cfg, self.model_cfg, tokenizer, cache)
        saved = ctx.from_main(lambda: prepare_run(run_dir, self.config, resume, ctx.world_size))
        self._build(train_pieces, tokenizer)
        self.state = TrainerState()
        self.resumed = saved is not None
        if saved is not None:
            self.resume(saved)

        with_penalty = bool(cfg.gate_lambda) and cfg.gate != "none"
        self.ddp = wrap_model(TrainStep(self.model, with_penalty), ctx, find_unused=cfg.gate != "none")
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.metrics = MetricsLog(run_dir / METRICS_FILE, keep_until_step=self.state.step if self.resumed else None,
                                  write=self.main)
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.tensorboard:
                self.metrics.open_tensorboard(run_dir / TENSORBOARD_DIR)
        self.save_every = cfg.save_every or cfg.eval_every or None
        share = split_pieces([len(p) for p in self.val_pieces], ctx.world_size)[ctx.rank]
        self.val_share = [self.val_pieces[i] for i in share]
        self.special = dict(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)

    def _build(self, train_pieces, tokenizer) -> None:
        """The seeded model, its optimizer, the training stream and the LR schedule (in this order: what
        a seed gives depends on it)."""
        cfg, ctx = self.cfg, self.ctx
        _seed_everything(cfg.seed)
        self.model = DSMR(self.model_cfg).to(self.device)
        if cfg.init_from is not None:  # a resume then loads the run's own weights over these
            self._start_from(cfg.init_from, tokenizer)
        if ctx.enabled:  # same initial weights (DDP broadcasts rank 0's anyway), different dropout draws
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, ctx.rank]).generate_state(1)[0]))
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.stream = training_stream(cfg, train_pieces, tokenizer, rank=ctx.rank, world_size=ctx.world_size)
        self.total = total = total_steps(cfg, self.stream)
        ctx.check_same("the run config and training data",
                       (self.config["train"], self.config["tokenizer_hash"], len(train_pieces),
                        int(self.stream.inputs_per_piece.sum()), len(self.val_pieces), total))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(500, total // 20)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))

    def _start_from(self, ref: str, tokenizer) -> None:
        """Fine-tuning: the weights of the model `ref`, whose network and tokenizer this run must share."""
        source = load_model(ref, device=str(self.device))
        try:
            check_tokenizer(source.run_config, tokenizer, f"--from {ref}: the training cache")
        except DsmrError as err:
            kind = source.run_config["tokenizer"].get("kind")
            raise DsmrError(f"{err}; tokenize your MIDI in the model's encoding first (dsmr data build ... "
                            f"--tokenizer {kind})") from None
        mine, theirs = self.model_cfg.to_dict(), source.cfg.to_dict()
        differ = [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in mine.items()
                  if k not in ("init_std", "dropout") and theirs.get(k) != v]  # neither changes the weights' meaning
        if differ:
            raise DsmrError(f"--from {ref}: its network is not this run's ({'; '.join(differ)})")
        self.model.load_state_dict(source.state_dict())

    def resume(self, saved: dict) -> None:
        """Continue from a saved trainer state: weights, optimizer, LR schedule, stream position, this rank's
        RNG states and recurrent state, step and best validation NLL."""
        ctx, s = self.ctx, self.state
        # rank 0 loads the weights; DistributedDataParallel hands them to the other ranks
        ctx.from_main(lambda: resume_weights(self.model, self.run_dir, saved, device=str(self.device)))
        saved.pop("model", None)  # a copy of the weights: not needed any more
        check_optimizer_state(saved["optimizer"], self.optimizer, self.run_dir / TRAINER_STATE_FILE)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.stream.load_state_dict(saved["stream"])  # the shared lane assignment: the same on every rank
        mine = saved["ranks"][ctx.rank] if ctx.enabled else saved
        set_rng_state(mine["rng"])
        s.memory = state_from_cpu(mine["memory"], self.device)
        s.step, s.best_nll = int(saved["step"]), float(saved["best_val_nll"])
        if saved.get("config", {}).get("val_pieces", self.cfg.val_pieces) != self.cfg.val_pieces:
            s.best_nll = math.inf  # measured on other validation pieces: not comparable with what follows
        s.saved_step = s.resumed_from = s.step

    def run(self) -> dict:
        """Train to the last step (or to a stop request), validating, logging and saving on the way."""
        from tqdm.auto import tqdm

        cfg, s = self.cfg, self.state
        self.bar = tqdm(total=self.total, initial=s.step, disable=not (self.progress and self.main), unit="step",
                        desc="train", dynamic_ncols=True)
        if cfg.eval_at_start and s.step == 0 and not self.resumed:
            s.last_eval = self.validate()
        batches = iter(self.stream)
        self.model.train()
        with _StopRequest(distributed=self.ctx.enabled) as stop, PeakMemory(self.device) as train_memory:
            while s.step < self.total:
                if (stop.requested and not self.ctx.enabled) or not self.optimization_step(batches, stop):
                    s.interrupted = True
                    break
                self.bar.update(1)
                if s.step % cfg.log_every == 0 or s.step == self.total:
                    self.log_interval()
                if cfg.eval_every and s.step % cfg.eval_every == 0 and self.val_pieces:
                    s.last_eval = self.validate()
                    if self.progress and self.main:
                        self.bar.write(f"step {s.step}: val ppl {s.last_eval['ppl']:.3f} "
                                       f"(nll {s.last_eval['nll']:.4f})", file=sys.stderr)
                if self.save_every and s.step % self.save_every == 0:
                    self.save_latest()
        self.bar.close()
        return self.finish(train_memory)

    def optimization_step(self, batches, stop: "_StopRequest") -> bool:
        """One optimizer step over `grad_accum` segment batches. False when the run stops instead: the
        stream, the recurrent state and the RNG states are then those of the end of the last step."""
        cfg, ctx, s = self.cfg, self.ctx, self.state
        rewind = (self.stream.state_dict(), s.memory, rng_state())  # where a KeyboardInterrupt goes back to
        step_start = time.perf_counter()
        if cfg.horizon_warmup:
            self.model.set_horizons(horizons_at(s.step, self.model_cfg.horizons, cfg.horizon_warmup))
        try:
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            n_targets = sum(b.num_targets for b in micro)
            if ctx.enabled:  # the loss divides by the targets of all ranks; ranks stop together
                n_all, stops = ctx.all_sum([n_targets, stop.requested])
                if stops:
                    self.stream.load_state_dict(rewind[0])
                    return False
                n_targets = int(n_all)
            nll_total = self._forward_backward(micro, n_targets)
        except KeyboardInterrupt:
            if ctx.enabled:  # other ranks may be inside a collective: no way to save together
                raise
            self.stream.load_state_dict(rewind[0])
            s.memory = rewind[1]
            set_rng_state(rewind[2])  # dropout may have drawn numbers in the unfinished step
            return False
        self.optimizer.step()
        self.scheduler.step()
        s.step += 1
        seconds = time.perf_counter() - step_start  # time in training steps only (no evals, saves)
        s.train_seconds += seconds
        s.interval.seconds += seconds
        s.train_targets += n_targets
        s.interval.nll += nll_total
        s.interval.targets += n_targets
        return True

    def _forward_backward(self, micro: list, n_targets: int) -> float:
        """Gradients of the mean NLL over `n_targets` (plus the gate penalty), clipped; the recurrent state
        carried through the micro-batches. Returns the summed NLL of this rank."""
        cfg, ctx, s = self.cfg, self.ctx, self.state
        self.optimizer.zero_grad(set_to_none=True)
        nll_total = 0.0
        for i, batch in enumerate(micro):
            batch = _to_device(batch, self.device)
            # gradients are all-reduced once per optimizer step, after the last micro-batch
            last = i == len(micro) - 1
            with (self.ddp.no_sync() if ctx.enabled and not last else contextlib.nullcontext()):
                with autocast(self.device, self.use_amp):
                    logits, new_state, penalty = self.forward(batch.ids, batch.positions, batch.reset, s.memory,
                                                              batch.token_mask)
                nll = token_nll(logits, batch.targets)
                loss = nll / max(n_targets, 1)
                if ctx.enabled:
                    loss = loss * ctx.world_size  # DDP averages gradients over ranks
                if penalty is not None:
                    loss = loss + cfg.gate_lambda * penalty / cfg.grad_accum
                loss.backward()
            s.memory = [m.detached() for m in new_state]
            nll_total += float(nll.detach())
        # the norm of all gradients (after DDP's all-reduce: the same on every rank, so ranks stop together)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        if not math.isfinite(float(norm)):
            raise TrainingDiverged(
                f"training diverged at step {s.step + 1}: the loss or its gradients are not finite (gradient norm "
                f"{float(norm)}); the weights were not updated with them and the last saved checkpoint is "
                f"kept. Lower --lr (now {cfg.lr:g}) or --init-std, or raise --warmup-steps")
        return nll_total

    def log_interval(self) -> None:
        """A metrics record of the steps since the last one: loss, learning rate, tokens/s, gates (and the
        horizons of a curriculum)."""
        s, iv = self.state, self.state.interval
        interval_nll = self.ctx.all_sum([iv.nll])[0]  # targets are already global
        s.last_loss = interval_nll / max(iv.targets, 1)
        gates = self.model.gate_values()
        record = {"step": s.step, "epoch": self.stream.epoch, "loss": s.last_loss,
                  "lr": self.scheduler.get_last_lr()[0], "tokens": iv.targets,
                  "tokens_per_s": iv.targets / iv.seconds if iv.seconds > 0 else None,
                  "gates": gates.cpu().tolist() if gates is not None else None}
        postfix = dict(loss=f"{s.last_loss:.3f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}")
        if self.cfg.horizon_warmup:
            record["horizons"] = list(self.model.active_horizons())
            postfix["mem"] = "/".join(map(str, record["horizons"]))
        if s.resumed_from is not None:  # this interval began at the resume, not at a log boundary
            record.update(resumed_from=s.resumed_from, interval_steps=s.step - s.resumed_from)
            s.resumed_from = None
        self.metrics.log(record)
        self.bar.set_postfix(**postfix)
        s.interval = Interval()

    def validate(self) -> dict | None:
        """Full-piece validation (each rank its share) with the full schedule, curriculum or not; a new
        best NLL saves best.safetensors. None when there are no validation pieces."""
        cfg, s = self.cfg, self.state
        if not self.val_pieces:
            return None
        training_horizons = self.model.active_horizons()
        self.model.set_horizons(self.model_cfg.horizons)
        result = (evaluate(self.model, self.val_share, cfg.eval_batch_size or cfg.batch_size, cfg.segment_len,
                           device=self.device, amp=cfg.amp, **self.special) if self.val_share else None)
        self.model.set_horizons(training_horizons)
        result = reduce_evaluation(result, self.ctx, len(NLL_BUCKETS))
        self.metrics.log({"step": s.step, "val_nll": result["nll"], "val_ppl": result["ppl"],
                          "val_tokens_per_s": result["tokens_per_s"]})
        if not math.isfinite(result["nll"]):
            raise TrainingDiverged(f"training diverged by step {s.step}: the validation loss is {result['nll']}; "
                                   f"the last saved checkpoint is kept. Lower --lr (now {cfg.lr:g}) or --init-std")
        if result["nll"] < s.best_nll:
            self.check_weights()
            s.best_nll = result["nll"]
            if self.main:
                save_checkpoint(self.run_dir, self.model, self.config, {"step": s.step}, best=True)
        return dict(result, step=s.step)

    def check_weights(self) -> None:
        """TrainingDiverged when a weight is no longer finite or beyond any trained network's (what the loader
        refuses as damaged): such weights are never saved. The same on every rank (DDP keeps them equal)."""
        for name, p in self.model.named_parameters():
            top = float(p.detach().abs().max()) if p.numel() else 0.0
            if not top <= MAX_ABS_WEIGHT:  # NaN fails too
                raise TrainingDiverged(
                    f"training diverged by step {self.state.step}: weight {name} reached {top:.3g}; it was not "
                    f"saved and the last saved checkpoint is kept. Lower --lr (now {self.cfg.lr:g}) or --init-std")

    def save_latest(self) -> None:
        """The resumable checkpoint of this step (a collective: every rank calls it at the same step)."""
        self.check_weights()
        saved_state = self._resumable_state()
        if self.main:
            self.metrics.flush()  # first: every record up to the checkpoint's step is on disk before it exists
            save_checkpoint(self.run_dir, self.model, self.config, saved_state)
        self.state.saved_step = self.state.step

    def _resumable_state(self) -> dict | None:
        """What trainer_state.pt holds (on rank 0; None elsewhere). Distributed, every rank's recurrent
        state and RNG states go into "ranks"."""
        s, ctx = self.state, self.ctx
        mine = {"rng": rng_state(), "memory": state_to_cpu(s.memory)}
        ranks = ctx.gather_to_main(mine)
        if not self.main:
            return None
        saved_state = {"step": s.step, "best_val_nll": s.best_nll, "optimizer": self.optimizer.state_dict(),
                       "scheduler": self.scheduler.state_dict(), "stream": self.stream.state_dict(), **mine,
                       "config": self.config["train"], "world_size": ctx.world_size}
        if ctx.enabled:
            saved_state["ranks"] = [mine] + ranks[1:]
        return saved_state

    def finish(self, train_memory: PeakMemory) -> dict:
        """The last validation and save (unless this step has them), then train()'s result."""
        cfg, ctx, s = self.cfg, self.ctx, self.state
        self.model.set_horizons(self.model_cfg.horizons)
        if not s.interrupted and self.val_pieces and (s.last_eval is None or s.last_eval["step"] != s.step):
            s.last_eval = self.validate()
            s.saved_step = None  # best_val_nll changed: the trainer state must record it
        if s.saved_step != s.step:
            self.save_latest()
        if self.main:
            remove_run_temporaries(self.run_dir)  # of saves killed earlier in this run's life
        self.metrics.close()
        # the slowest rank sets the pace; peak memory is per process (the largest of any rank)
        train_seconds, train_peak = ctx.all_max([s.train_seconds, train_memory.peak_bytes])
        bpv = 2 if self.use_amp else 4
        eval_fields = dict.fromkeys(("ppl", "nll", "tokens", "pieces", "tokens_per_s", "peak_memory_bytes",
                                     "nll_by_position"))
        eval_fields["state_bytes"] = state_bytes(self.model, 1, bpv)
        eval_fields.update({k: v for k, v in (s.last_eval or {}).items() if k != "step"})
        return {
            **eval_fields,
            "steps": s.step,
            "epoch": self.stream.epoch,
            "train_loss": s.last_loss,
            "train_tokens_per_s": s.train_targets / train_seconds if train_seconds else None,
            "train_peak_memory_bytes": int(train_peak),
            "train_memory_method": train_memory.method,
            "train_state_bytes": self.model_cfg.state_bytes(cfg.batch_size, bpv),
            "best_val_nll": s.best_nll if math.isfinite(s.best_nll) else None,
            "interrupted": s.interrupted,
            "world_size": ctx.world_size,
            "run_dir": str(self.run_dir),
        }
