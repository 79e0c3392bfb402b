"""dsmr against x-transformers (Transformer-XL-style recurrent memory) at equal size, in one run.

Training: tokens/s and peak memory of one optimizer step per segment (random tokens, state carried), at
0, 512 and 2048 positions of memory per layer; for dsmr also model FLOP/s as a fraction of this
machine's measured float32 matmul peak (2048 x 2048, same thread count). dsmr trains with key/value
memory (`dsmr`) and with hidden memory (`dsmr-hidden`, the layer inputs, projected again each segment,
which is what x-transformers' Transformer-XL memory keeps and dsmr train's default). Generation: events/s of
sampling after a prompt, dsmr's decoder (float32, float16 and int8 weights; float16 and int8 run dsmr's
fused CPU step, int8 is `dsmr generate`'s CPU default) vs x-transformers' cached-KV `generate`;
`dsmr-float16-compile` is PyTorch's compiled decoding step instead of the fused one (`--compile` with
float32 weights; its one-off warm-up is reported apart). Every measurement runs in a fresh subprocess (peak memory of its own).

x-transformers is a benchmark-only extra, never a dependency of dsmr:

    .venv/bin/pip install x-transformers
    .venv/bin/python benchmarks/bench_peers.py                    # default size, 2 threads (training)
    .venv/bin/python benchmarks/bench_peers.py --quick            # a smoke test (tiny steps)

Default size: 6 layers, d_model 256, 4 heads, segment 512, batch 4 (training); generation on 1 thread
after a --prompt-tokens prompt with the same memory (dsmr: horizon 2048 in every layer, x-transformers:
a KV cache; x-transformers' cache grows with the piece, dsmr's state does not).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_peak import matmul_peak, training_flops_per_token  # noqa: E402
VOCAB = 391  # the performance encoding


def train_worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, M = args.batch, args.segment, args.memory
    ids = torch.randint(3, VOCAB, (B, T * (args.steps + 1)))
    if args.lib.startswith("dsmr"):
        from dsmr.model import DSMR, DSMRConfig

        model = DSMR(DSMRConfig(vocab_size=VOCAB, n_layers=6, d_model=256, n_heads=4, horizons=(M,) * 6,
                                memory="hidden" if args.lib == "dsmr-hidden" else "kv"))
    else:
        from x_transformers import Decoder, TransformerWrapper

        model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=T, max_mem_len=M,
                                   attn_layers=Decoder(dim=256, depth=6, heads=4, rotary_pos_emb=True))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = None
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = None
    for step in range(args.steps + 1):
        if step == 1:  # the first step warms up allocators and kernels
            start = time.perf_counter()
        x = ids[:, step * T:(step + 1) * T]
        y = ids[:, step * T + 1:(step + 1) * T + 1] if (step + 1) * T + 1 <= ids.shape[1] else x
        if args.lib.startswith("dsmr"):
            positions = torch.arange(step * T, (step + 1) * T).expand(B, -1)
            logits, state = model(x, positions, state=state)
        else:
            logits, mems = model(x, mems=state, return_mems=True) if M else (model(x), None)
            state = [m.detach() for m in mems] if mems is not None else None
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    tokens = args.steps * B * T
    out = {"lib": args.lib, "memory": M, "tokens_per_s": round(tokens / seconds, 1),
           "peak_rss_rise_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024, 1)}
    if args.lib.startswith("dsmr"):
        flops = training_flops_per_token(model.cfg, T) * tokens / seconds
        peak = matmul_peak(args.threads)
        out.update(model_gflops=round(flops / 1e9, 1), matmul_peak_gflops=round(peak / 1e9, 1),
                   mfu=round(flops / peak, 3))
    return out


def generate_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompt = torch.randint(3, VOCAB, (1, args.prompt_tokens))
    if args.lib.startswith("dsmr"):
        from dsmr.generation import SamplingConfig, generate_batch, half_weight_model, int8_weight_model
        from dsmr.model import DSMR, DSMRConfig
        from dsmr.data.tokenizers.registry import make_tokenizer

        tokenizer = make_tokenizer("performance")
        model = DSMR(DSMRConfig(vocab_size=tokenizer.vocab_size, n_layers=6, d_model=256, n_heads=4,
                                horizons=(args.memory,) * 6)).eval()
        if "float16" in args.lib:
            model = half_weight_model(model)
        elif "int8" in args.lib:
            model = int8_weight_model(model)
        compile = "compile" in args.lib
        result = generate_batch(model, tokenizer, args.segment, prompt[0].tolist(),
                                SamplingConfig(seed=0, max_tokens=args.tokens, stop_at_eos=False), progress=False,
                                compile=compile, fused=not compile)[0]
        return {"lib": args.lib, "tokens_per_s": round(result.tokens_per_s, 1),
                "warmup_seconds": round(result.warmup_seconds, 1), "state_bytes": result.state_bytes}
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    net = TransformerWrapper(num_tokens=VOCAB, max_seq_len=args.prompt_tokens + args.tokens,
                             attn_layers=Decoder(dim=256, depth=6, heads=4, rotary_pos_emb=True))
    wrapper = AutoregressiveWrapper(net).eval()
    with torch.inference_mode():
        wrapper.generate(prompt, 8, cache_kv=True)  # warm-up
        start = time.perf_counter()
        wrapper.generate(prompt, args.tokens, cache_kv=True)
        seconds = time.perf_counter() - start
    return {"lib": args.lib, "tokens_per_s": round(args.tokens / seconds, 1)}


def spawn(kind: str, **options) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"lib": options.get("lib"), "memory": options.get("memory"), "error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke test: few steps and events")
    parser.add_argument("--memories", default="0,512,2048", help="memory positions per layer (training)")
    parser.add_argument("--threads", type=int, default=2, help="threads for training (default 2)")
    parser.add_argument("--gen-threads", type=int, default=1, help="threads for generation (default 1)")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip dsmr's compiled decoding step")
    parser.add_argument("--json-out", type=Path)
    # worker mode (internal)
    parser.add_argument("--worker", choices=("train", "generate"), help=argparse.SUPPRESS)
    parser.add_argument("--lib", default="dsmr", help=argparse.SUPPRESS)
    parser.add_argument("--memory", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--segment", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=500, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-tokens", type=int, default=2048, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(train_worker(args) if args.worker == "train" else generate_worker(args)))
        return

    steps, gen_tokens, prompt_tokens = (2, 50, 256) if args.quick else (10, 500, 2048)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other work slows every figure)")
    figures = {"training": [], "generation": []}
    if not args.skip_training:
        print(f"\ntraining: 6 layers, d_model 256, 4 heads, segment 512, batch 4, {args.threads} threads, "
              f"{steps} optimizer steps after one warm-up step")
        print(f"{'memory':>6} {'lib':>14} {'tokens/s':>9} {'peak RSS rise MiB':>17} {'model GFLOP/s':>13} {'MFU':>5}")
        for memory in (int(m) for m in args.memories.split(",")):
            libs = ("dsmr", "dsmr-hidden", "x-transformers") if memory else ("dsmr", "x-transformers")
            rows = [spawn("train", lib=lib, memory=memory, steps=steps, threads=args.threads) for lib in libs]
            for r in rows:
                figures["training"].append(r)
                if "error" in r:
                    print(f"{memory:>6} {r['lib']:>14}  failed: {r['error']}")
                    continue
                print(f"{memory:>6} {r['lib']:>14} {r['tokens_per_s']:>9.0f} {r['peak_rss_rise_mib']:>17.1f} "
                      + (f"{r['model_gflops']:>13.1f} {r['mfu']:>5.2f}" if "mfu" in r else ""))
            peer = rows[-1]
            for r in rows[:-1]:
                if "error" not in r and "error" not in peer:
                    print(f"{'':>6} {r['lib'] + ' / x-tr.':>14} x{r['tokens_per_s'] / peer['tokens_per_s']:.2f} speed, "
                          f"x{r['peak_rss_rise_mib'] / max(peer['peak_rss_rise_mib'], 1e-9):.2f} memory")
    if not args.skip_generation:
        libs = (["dsmr-float32", "dsmr-float16", "dsmr-int8"] + ([] if args.no_compile else ["dsmr-float16-compile"])
                + ["x-transformers"])
        print(f"\ngeneration: same size, memory 2048 per layer, {gen_tokens} events after a {prompt_tokens}-event "
              f"prompt, {args.gen_threads} thread(s)")
        for lib in libs:
            r = spawn("generate", lib=lib, memory=2048, segment=512, tokens=gen_tokens, prompt_tokens=prompt_tokens,
                      threads=args.gen_threads)
            figures["generation"].append(r)
            print(f"{lib:>22} " + (f"failed: {r['error']}" if "error" in r else f"{r['tokens_per_s']:>8.0f} events/s"
                                   + (f"  (warm-up {r['warmup_seconds']:.0f} s)" if r.get("warmup_seconds") else "")))
    if args.json_out:
        from dsmr.core.atomic import atomic_write_json

        atomic_write_json(args.json_out, {**figures, "load_average": os.getloadavg()[0],
                                          "when": time.strftime("%Y-%m-%d %H:%M:%S")})


if __name__ == "__main__":
    main()
