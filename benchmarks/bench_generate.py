"""Generation speed and memory of the default DSMR model on this machine.

Measures, each in a fresh subprocess (so one run's allocations cannot hide another's):
  * speed: tokens/s of one-token sampling after a prompt, for each precision x thread count, and the
    real-time factor (seconds of music generated per second of wall time);
  * memory: peak resident memory during generation (ru_maxrss) and its rise above the resident size at
    the start of generation, after 10k vs 100k generated tokens, with the decoder's state bytes, which
    must be identical.

Without --checkpoint the model has random weights (the default trainer size: 6 layers, d_model 256,
4 heads, segment 256, two-scale budget 2560 = 2 x 1024 + 4 x 128). Speed does not depend on the
weights, but the music a random model writes does not have MAESTRO's density, so the real-time factor
is computed from MAESTRO's token rate (tokens per second of music, measured on validation pieces when
the dataset is present). With --checkpoint the generated music's own duration is also reported.

    .venv/bin/python benchmarks/bench_generate.py                 # full run (~8 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_generate.py --quick         # 2k-token speed runs, 5k vs 20k memory
    .venv/bin/python benchmarks/bench_generate.py --threads-list 1,2 --speed-only
    # the fused step with int8 and float16 weights (dsmr generate's CPU default is int8)
    .venv/bin/python benchmarks/bench_generate.py --speed-only --precisions int8,float16 --modes fused,fused
    # the decoding steps against the code of another commit, one process each, same machine
    .venv/bin/python benchmarks/bench_generate.py --speed-only --precisions int8,float16 --modes before-fused,fused \
        --before 3161ab8 --speed-tokens 2000
    # batched sampling: 16 lanes on 2 threads (total and per-sample events/s)
    .venv/bin/python benchmarks/bench_generate.py --speed-only --precisions float16 --threads-list 2 --num-samples 16

    # each run's share of the bound set by the machine's read bandwidth (weights + state read once per step)
    .venv/bin/python benchmarks/bench_generate.py --speed-only --precisions float16 --modes eager,compile --roofline

    # a one-lane step's time: whole (fused int8 / float16, compiled, eager) against dsmr.backends.cpu.kernels' products and
    # attentions alone
    .venv/bin/python benchmarks/bench_generate.py --kernel-split

    # state bytes and per-event time after 10k and after 100k generated events, in one process
    .venv/bin/python benchmarks/bench_generate.py --flat 10000,100000 --modes fused --precisions int8

Modes: `fused` (default) is what generate runs on a CPU: dsmr.backends.cpu.kernels' whole-step op; `eager` runs
PyTorch's decoding step (with dsmr.backends.cpu.kernels' products and attention inside), `compile` compiles it first
(torch.compile; the warm-up is reported separately and not in events/s); `eager-pt` / `compile-pt` the
same without dsmr.backends.cpu.kernels (DSMR_KERNELS=0: PyTorch's kernels only); `before` runs the eager measurement with
the `src/` tree of the commit given by --before (extracted with git archive), `before-fused` its fused step,
for before/after ratios from one run. Precisions: float32, float16, int8 (int8 needs this tree: not with `before`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAESTRO = Path(os.environ.get("DSMR_MAESTRO", REPO.parent / "shared" / "data" / "maestro-v3.0.0"))
FALLBACK_TOKENS_PER_SECOND = 41.2  # MAESTRO validation, performance encoding (measured, see docs/generation.md)


def worker(args) -> dict:
    """One measurement in this process: build or load the model, generate, report figures as JSON."""
    import torch

    import inspect

    try:
        import dsmr.generation as gen
    except ImportError:  # the code of mode "before" may keep generation in one module
        import dsmr.generate as gen
    SamplingConfig, half_weight_model = gen.SamplingConfig, gen.half_weight_model
    try:
        from dsmr.data.tokenizers.registry import make_tokenizer
    except ImportError:
        from dsmr.data.tokenizers.performance import make_tokenizer

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from dsmr.sharing.loader import load_model

        model = load_model(args.checkpoint)
        tokenizer, segment_len = model.tokenizer, model.segment_len
        weights = f"checkpoint {args.checkpoint}"
    else:
        tokenizer = make_tokenizer("performance")
        model = default_model(tokenizer.vocab_size)
        segment_len = 256
        weights = "random"
    if args.precision == "float16":
        model = half_weight_model(model)
    elif args.precision == "int8":  # the code of mode "before" may not have it
        model = gen.int8_weight_model(model)
    prompt = torch.randint(3, tokenizer.vocab_size, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(1)).tolist() if args.prompt_tokens else None
    sampling = SamplingConfig(seed=0, max_tokens=args.tokens, stop_at_eos=False)
    if hasattr(gen, "generate_batch"):
        results = gen.generate_batch(model, tokenizer, segment_len, prompt, sampling, num_samples=args.num_samples,
                                     progress=False, compile=args.mode.startswith("compile"),
                                     **({"fused": args.mode in ("fused", "before-fused")}
                                        if "fused" in inspect.signature(gen.generate_batch).parameters else {}))
    else:  # the code before batched generation (mode "before")
        if args.num_samples != 1 or args.mode.startswith("compile"):
            sys.exit("this version of dsmr has neither batched generation nor a compiled step")
        results = [gen.generate(model, tokenizer, segment_len, prompt, sampling, progress=False)]
    result = results[0]
    # generate's meter resets the kernel's high-water mark as it starts (Linux), so ru_maxrss now is the
    # peak resident size *during* generation: interpreter, libraries and model included.
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    new_tokens = sum(r.new_tokens for r in results)
    sampling_s = max(result.wall_seconds - result.prefill_seconds, 1e-9)
    return {**result.summary(), "weights": weights, "precision": args.precision, "threads": args.threads,
            "mode": args.mode, "num_samples": len(results), "source": gen.__file__,
            "kernels": bool(getattr(sys.modules.get("dsmr.backends.cpu.kernels"), "loaded", lambda: False)()),
            "horizons": list(model.cfg.horizons), "segment_len": segment_len,
            "tokens_per_s": round(new_tokens / sampling_s, 1),  # all lanes together
            "tokens_per_s_per_sample": round(new_tokens / sampling_s / len(results), 1),
            "prefill_tokens_per_s": round(args.prompt_tokens / max(result.prefill_seconds, 1e-9), 1),
            # per CPU second instead of per wall second: what the process does with a core to itself,
            # when other work on the machine takes part of its time
            "tokens_per_cpu_s": round(new_tokens / max(result.sampling_cpu_seconds, 1e-9), 1),
            "warmup_seconds": round(getattr(result, "warmup_seconds", 0.0), 2),
            "weight_bytes_per_step": weight_bytes_per_step(model),
            "ru_maxrss_bytes": peak_rss}


def default_model(vocab_size: int):
    """The default trainer size with random weights (seed 0): 6 layers, d_model 256, two-scale horizons."""
    import torch

    from dsmr.model import DSMR, DSMRConfig

    torch.manual_seed(0)
    return DSMR(DSMRConfig(vocab_size=vocab_size, n_layers=6, d_model=256, n_heads=4,
                           horizons=(1024, 1024, 128, 128, 128, 128))).eval()


def kernel_split(threads: int, steps: int = 300) -> None:
    """Where a one-lane float16 step's time goes: the whole eager, compiled and fused steps (and the fused one
    with int8 weights), then dsmr.backends.cpu.kernels' parts alone on the same weights and (prompt-filled) state: the 25
    products, the 6 attentions, both."""
    import torch

    from dsmr.backends.cpu import kernels
    from dsmr.generation import IncrementalDecoder, decoding_state_dtype, half_weight_model, int8_weight_model
    from dsmr.data.tokenizers.registry import make_tokenizer

    torch.set_num_threads(threads)
    base = default_model(make_tokenizer("performance").vocab_size)
    model = half_weight_model(base)
    if not kernels.loaded():
        sys.exit(f"dsmr.backends.cpu.kernels are not loaded here: {kernels.load_error() or 'DSMR_KERNELS=0'}")
    vocab = model.cfg.vocab_size
    prompt = torch.randint(3, vocab, (1, 2048), generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([5])

    def per_step_ms(fn) -> float:
        for _ in range(20):
            fn()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - start) / steps * 1e3

    rows = []
    for name, weights, compile, fused in (("fused, int8 weights", int8_weight_model(base), False, True),
                                          ("fused", model, False, True), ("compiled", model, True, False),
                                          ("eager", model, False, False)):
        decoder = IncrementalDecoder(weights, 256, compile=compile, state_dtype=decoding_state_dtype(model, compile),
                                     fused=fused)
        decoder.warm_up()
        decoder.feed(prompt, last_only=True)
        rows.append((f"whole step, {name}", per_step_ms(lambda: decoder.step(ids))))
    linears = [m for m in model.modules() if getattr(m, "packed", None) is not None]
    xs = [torch.randn(1, m.packed.shape[1] * 8) for m in linears]
    masks = [torch.zeros(1, 1, 1, k.shape[2]) for k in decoder.keys]
    q = torch.randn(1, model.cfg.n_heads, 1, model.cfg.head_dim)
    scale = model.cfg.head_dim ** -0.5

    def products():
        for m, x in zip(linears, xs):
            kernels.half_linear(x, m.packed, m.weight.shape[0])

    def attentions():
        for k, v, mask in zip(decoder.keys, decoder.values, masks):
            kernels.decode_attention(q, k, v, mask, scale)

    with torch.inference_mode():
        rows += [(f"the {len(linears)} products alone", per_step_ms(products)),
                 (f"the {len(masks)} attentions alone", per_step_ms(attentions)),
                 ("products + attentions", per_step_ms(lambda: (products(), attentions())))]
    weights = sum(m.packed.nbytes for m in linears)
    state = sum(t.nbytes for t in (*decoder.keys, *decoder.values))
    print(f"one lane, {threads} thread(s); float16 weights {weights / 1e6:.2f} MB (packed), state {state / 1e6:.2f} MB")
    for name, ms in rows:
        print(f"{name:>28}: {ms:6.3f} ms per step ({1e3 / ms:6.0f} per s)")


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decoding step reads: every parameter and buffer once, except the embedding
    table, of which it reads one row (the whole table when it is also the output head)."""
    # a packed copy of a weight (dsmr.backends.cpu.kernels.pack_half) is read instead of the weight, not as well
    buffers = [b for name, b in model.named_buffers() if not name.endswith((".packed", ".packed_scale"))]
    tensors = {id(t): t for t in (*model.parameters(), *buffers)}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    table = model.embedding.weight
    if getattr(model.head, "weight", None) is not table:
        total -= table.numel() * table.element_size() - table.shape[1] * table.element_size()
    return total


def flat_worker(args) -> dict:
    """One long piece through the decoder (no prompt, default model, random weights), timing every
    window of --window events: the per-event time and the state bytes at each checkpoint of --flat.
    The loop is generate's (sample_next, then one decoder step; the events kept in an array), without
    its per-lane bookkeeping."""
    from array import array

    import torch

    from dsmr.generation import (IncrementalDecoder, SamplingConfig, banned_mask, decoding_state_dtype, half_weight_model,
                               sample_next)
    from dsmr.data.tokenizers.registry import make_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = make_tokenizer("performance")
    model = default_model(tokenizer.vocab_size)
    if args.precision == "float16":
        model = half_weight_model(model)
    elif args.precision == "int8":  # imported here: the code of mode "before" may not have it
        from dsmr.generation import int8_weight_model

        model = int8_weight_model(model)
    checkpoints = sorted(int(n) for n in args.flat.split(","))
    sampling = SamplingConfig(seed=0, max_tokens=None, stop_at_eos=False)
    banned = banned_mask(tokenizer, sampling)[None]
    generator = torch.Generator().manual_seed(0)
    compiled = args.mode.startswith("compile")  # the state generate_batch would use
    decoder = IncrementalDecoder(model, 256, compile=compiled, state_dtype=decoding_state_dtype(model, compiled),
                                 fused=args.mode == "fused")
    warmup = decoder.warm_up()
    events = array("q")
    rows = []
    with torch.inference_mode():
        logits = decoder.feed(torch.tensor([[tokenizer.bos_id]]), last_only=True)
        step_input = torch.zeros(1, dtype=torch.long)
        window_start, start = time.perf_counter(), time.perf_counter()
        while len(events) < checkpoints[-1]:
            token = sample_next(logits, sampling, generator, banned)
            events.append(int(token))
            step_input.copy_(token)
            logits = decoder.step(step_input)
            n = len(events)
            if n % args.window == 0:
                now = time.perf_counter()
                if args.progress_file:  # "events seconds": lets a caller follow a long run
                    with open(args.progress_file, "a") as f:
                        f.write(f"{n} {now - start:.1f}\n")
                per_event = (now - window_start) / args.window
                window_start = now
                if any(c - args.window < n <= c for c in checkpoints):
                    rows.append({"events": n, "state_bytes": decoder.state_bytes(),
                                 "window_us_per_event": round(per_event * 1e6, 1),
                                 "window_events_per_s": round(1 / per_event, 1),
                                 "filled": decoder.filled(),
                                 "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
        total = time.perf_counter() - start
    return {"mode": args.mode, "precision": args.precision, "threads": args.threads, "window": args.window,
            "warmup_seconds": round(warmup, 1), "events": len(events), "seconds": round(total, 1),
            "events_per_s": round(len(events) / total, 1), "checkpoints": rows}


def spawn(tokens: int, precision: str, threads: int, prompt_tokens: int, checkpoint: str | None,
          mode: str = "eager", num_samples: int = 1, before_src: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--tokens", str(tokens), "--precision", precision,
           "--threads", str(threads), "--prompt-tokens", str(prompt_tokens), "--mode", mode,
           "--num-samples", str(num_samples)]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    env = dict(os.environ)
    if mode.endswith("-pt"):  # the same code without dsmr.backends.cpu.kernels: PyTorch's kernels only
        env["DSMR_KERNELS"] = "0"
    if mode.startswith("before"):  # the other commit's package first on the path, its kernels built apart
        env["PYTHONPATH"] = os.pathsep.join([str(before_src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["TORCH_EXTENSIONS_DIR"] = str(before_src.parent / "torch_extensions")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.exit(f"worker failed ({' '.join(cmd)}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def maestro_tokens_per_second(pieces: int = 40) -> tuple[float, str]:
    """Tokens per second of music in MAESTRO validation pieces (performance encoding)."""
    import csv

    from dsmr.data.tokenizers.registry import make_tokenizer

    table = MAESTRO / "maestro-v3.0.0.csv"
    if not table.is_file():
        return FALLBACK_TOKENS_PER_SECOND, "fallback constant (MAESTRO not found)"
    tokenizer = make_tokenizer("performance")
    rows = [r for r in csv.DictReader(table.open()) if r["split"] == "validation"][:pieces]
    tokens = seconds = 0.0
    for row in rows:
        ids = tokenizer.encode_file(MAESTRO / row["midi_filename"])
        tokens += len(ids)
        seconds += tokenizer.seconds(ids)
    return tokens / seconds, f"{len(rows)} MAESTRO validation pieces"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a run folder or .safetensors (default: random weights)")
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the benchmark)")
    parser.add_argument("--threads-list", default="1", help="thread counts to time, e.g. 1,2 (default 1)")
    parser.add_argument("--speed-only", action="store_true", help="skip the 10k vs 100k memory runs")
    parser.add_argument("--precisions", default="float32,float16", help="precisions to time")
    parser.add_argument("--json-out", type=Path, help="also write all figures to this JSON file")
    parser.add_argument("--modes", default="fused",
                        help="decoding step(s) to time: fused (dsmr.backends.cpu.kernels' whole-step op, generate's default on "
                             "a CPU), eager, compile (PyTorch's step with dsmr.backends.cpu.kernels' ops), eager-pt, compile-pt "
                             "(without dsmr.backends.cpu.kernels), before, before-fused (the eager or fused step of the code of --before)")
    parser.add_argument("--before", default="HEAD", help="git revision whose src/ the 'before' mode runs")
    parser.add_argument("--num-samples", type=int, default=1, help="lanes sampled together (batched generation)")
    parser.add_argument("--speed-tokens", type=int, help="new events per speed run (default 4000; 2000 --quick)")
    parser.add_argument("--flat", help="instead of the speed runs: one piece of max(N) events, per-event time and "
                                       "state bytes over the --window events before each N, e.g. 10000,100000")
    parser.add_argument("--roofline", action="store_true",
                        help="also measure the read bandwidth at each run's working set (weights + state) and "
                             "report the events/s that bandwidth allows, and each run's share of it")
    parser.add_argument("--kernel-split", action="store_true",
                        help="instead of the speed runs: a one-lane float16 step eager and compiled, and "
                             "dsmr.backends.cpu.kernels' products and attentions alone on the same weights and state")
    parser.add_argument("--window", type=int, default=1000, help="events per timing window of --flat")
    parser.add_argument("--progress-file", help="--flat: append 'events seconds' to this file after each window")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=2000, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float16", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(flat_worker(args) if args.flat else worker(args)))
        return
    if args.flat:
        run_flat(args)
        return
    if args.kernel_split:
        kernel_split(int(args.threads_list.split(",")[0]))
        return

    speed_tokens, memory_tokens = (2000, (5_000, 20_000)) if args.quick else (4000, (10_000, 100_000))
    speed_tokens = args.speed_tokens or speed_tokens
    modes = args.modes.split(",")
    before_src = _extract_src(args.before) if any(m.startswith("before") for m in modes) else None
    rate, rate_source = maestro_tokens_per_second()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"weights: {args.checkpoint or 'random (speed does not depend on them)'}")
    print(f"MAESTRO density: {rate:.1f} tokens per second of music ({rate_source})\n")

    speed = []
    print(f"{speed_tokens} new events per run after a 2048-event prompt, {args.num_samples} sample(s) per run"
          + (f"; 'before' = src/ of {args.before}" if before_src else ""))
    print(f"{'mode':>10} {'precision':>9} {'threads':>7} {'tokens/s':>9} {'x real time':>11} {'prefill tok/s':>13}"
          f" {'load':>5} {'tokens/CPU-s':>12} {'x real time/CPU-s':>17} {'warm-up s':>9}")
    for precision in args.precisions.split(","):
        for threads in (int(t) for t in args.threads_list.split(",")):
            for mode in modes:
                r = spawn(speed_tokens, precision, threads, 2048, args.checkpoint, mode, args.num_samples, before_src)
                r["realtime_factor_maestro"] = round(r["tokens_per_s"] / rate, 2)
                r["load_average"] = round(os.getloadavg()[0], 2)  # other work on the machine slows this down
                speed.append(r)
                print(f"{mode:>10} {precision:>9} {threads:>7} {r['tokens_per_s']:>9.0f} "
                      f"{r['realtime_factor_maestro']:>11.1f} {r['prefill_tokens_per_s']:>13.0f} "
                      f"{r['load_average']:>5.1f} {r['tokens_per_cpu_s']:>12.0f} {r['tokens_per_cpu_s'] / rate:>17.1f}"
                      f" {r['warmup_seconds']:>9.1f}"
                      + (f"   ({r['tokens_per_s_per_sample']:.0f} per sample)" if args.num_samples > 1 else "")
                      + (f"   (own music: {r['realtime_factor']:.1f}x)" if args.checkpoint else ""))
    if len(modes) > 1:
        print("\nratios to the first mode (same precision and threads), per wall second and per CPU second:")
        for r in speed:
            ref = next(x for x in speed if (x["precision"], x["threads"]) == (r["precision"], r["threads"]))
            print(f"{r['mode']:>10} {r['precision']:>9} {r['threads']:>7}  x{r['tokens_per_s'] / ref['tokens_per_s']:.2f}"
                  f"  x{r['tokens_per_cpu_s'] / ref['tokens_per_cpu_s']:.2f}")

    if args.roofline:
        print_roofline(speed)
    if args.speed_only:
        _write(args.json_out, rate, speed, [])
        return
    best = max(speed, key=lambda r: r["tokens_per_s"])
    print(f"\nmemory ({best['precision']}, {best['threads']} thread(s)), fresh process per run:")
    print(f"{'tokens':>8} {'state bytes':>12} {'peak RSS MiB':>13} {'rise MiB':>9} {'tokens/s':>9} {'wall s':>7}")
    memory = []
    for tokens in memory_tokens:
        r = spawn(tokens, best["precision"], best["threads"], 0, args.checkpoint, best["mode"], 1, before_src)
        memory.append(r)
        print(f"{tokens:>8} {r['state_bytes']:>12} {r['ru_maxrss_bytes'] / 2**20:>13.1f} "
              f"{r['peak_memory_bytes'] / 2**20:>9.2f} {r['tokens_per_s']:>9.0f} {r['wall_seconds']:>7.1f}")
    same_state = memory[0]["state_bytes"] == memory[1]["state_bytes"]
    print(f"state bytes identical: {same_state}; peak RSS grew by "
          f"{(memory[1]['ru_maxrss_bytes'] - memory[0]['ru_maxrss_bytes']) / 2**20:.1f} MiB for "
          f"{memory_tokens[1] - memory_tokens[0]} more tokens (the token list itself is 8 bytes per token)")
    _write(args.json_out, rate, speed, memory)


def print_roofline(speed: list) -> None:
    """One decoding step reads every weight and the whole state (all lanes) once: at the machine's read
    bandwidth for that working set, that bounds the events per second no kernel can beat."""
    from machine_peak import read_bandwidth

    print("\nroofline: one step reads the weights and the whole state once (read bandwidth measured at that size)")
    print(f"{'mode':>10} {'precision':>9} {'threads':>7} {'weights MB':>10} {'state MB':>8} {'GB/s':>6} "
          f"{'bound events/s':>14} {'measured':>8} {'of bound':>8}")
    measured = {}  # one bandwidth per working set and thread count: the modes of a row share it
    for r in speed:
        step_bytes = r["weight_bytes_per_step"] + r["state_bytes"]
        key = (step_bytes, r["threads"])
        bandwidth = measured[key] = measured.get(key) or read_bandwidth(step_bytes, r["threads"])
        r["read_bytes_per_s"] = round(bandwidth)
        r["roofline_tokens_per_s"] = round(bandwidth / step_bytes * r["num_samples"], 1)
        print(f"{r['mode']:>10} {r['precision']:>9} {r['threads']:>7} {r['weight_bytes_per_step'] / 1e6:>10.2f} "
              f"{r['state_bytes'] / 1e6:>8.2f} {bandwidth / 1e9:>6.1f} {r['roofline_tokens_per_s']:>14.0f} "
              f"{r['tokens_per_s']:>8.0f} {r['tokens_per_s'] / r['roofline_tokens_per_s']:>8.0%}")


def run_flat(args) -> None:
    precision, threads, mode = args.precisions.split(",")[-1], args.threads_list.split(",")[0], args.modes.split(",")[0]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; one piece of "
          f"{max(int(n) for n in args.flat.split(','))} events, no prompt, {precision}, {threads} thread(s), {mode}")
    cmd = [sys.executable, __file__, "--worker", "--flat", args.flat, "--window", str(args.window),
           "--precision", precision, "--threads", threads, "--mode", mode]
    if args.progress_file:
        cmd += ["--progress-file", args.progress_file]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"worker failed ({' '.join(cmd)}):\n{proc.stderr}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"warm-up {r['warmup_seconds']} s; {r['events']} events in {r['seconds']} s = {r['events_per_s']} events/s")
    print(f"{'events':>8} {'state bytes':>12} {'us/event (last ' + str(args.window) + ')':>22} {'events/s':>9} "
          f"{'peak RSS MiB':>12}  filled per layer")
    for c in r["checkpoints"]:
        print(f"{c['events']:>8} {c['state_bytes']:>12} {c['window_us_per_event']:>22.1f} "
              f"{c['window_events_per_s']:>9.0f} {c['ru_maxrss_bytes'] / 2**20:>12.1f}  {c['filled']}")
    first, last = r["checkpoints"][0], r["checkpoints"][-1]
    print(f"state bytes identical: {first['state_bytes'] == last['state_bytes']}; per-event time "
          f"x{last['window_us_per_event'] / first['window_us_per_event']:.2f} from {first['events']} to {last['events']}")
    _write(args.json_out, FALLBACK_TOKENS_PER_SECOND, [r], [])


def _extract_src(revision: str) -> Path:
    """The src/ tree of a git revision, in a temporary folder (removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="dsmr-before-"))
    import atexit
    import shutil

    atexit.register(shutil.rmtree, folder, True)
    archive = subprocess.run(["git", "archive", revision, "src"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


def _write(path: Path | None, rate: float, speed: list, memory: list) -> None:
    if path is None:
        return
    from dsmr.core.atomic import atomic_write_json

    atomic_write_json(path, {"maestro_tokens_per_second": rate, "speed": speed, "memory": memory,
                             "load_average": os.getloadavg()[0], "when": time.strftime("%Y-%m-%d %H:%M:%S")})


if __name__ == "__main__":
    main()
