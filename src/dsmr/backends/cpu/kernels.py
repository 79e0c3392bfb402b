"""CPU kernels for one-token decoding, from kernels.cpp: `dsmr::decode_step` (the whole step of a model with
float16 or int8 weights in one call, its weights named by `dsmr::step_fields`), and its parts as ops of their
own for PyTorch's step: `dsmr::half_linear` and `dsmr::int8_linear` (float32 x times float16 / int8 weights,
packed once by `pack_half` / `pack_int8`) and `dsmr::decode_attention` (one query over a float16 or float32
key/value buffer).

They are built once on first use (`load()`: torch.utils.cpp_extension with the system's C++ compiler and
ninja, 1-4 minutes) into `build_directory()`, a folder named after what the build is made from -- the
source's content, the compiler, torch, Python and the flags -- so two checkouts or versions of dsmr on one
machine share a build when their kernels are the same and never rebuild each other's. They need an x86-64
CPU with AVX2, FMA and F16C. Where they cannot be built decoding runs the PyTorch path (same results up to
float rounding) after one warning; on another CPU, or with DSMR_KERNELS=0, silently. The products and
decode_attention have fake implementations, so a torch.compile'd decoding step calls them from its graph.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
NAME = "dsmr_cpu_kernels"
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c")
BUILD_WAIT_SECONDS = 900  # a build takes 1-4 minutes; waiting longer for another process's build: give up
_state = {"loaded": False, "error": None, "enabled": True}


def supported_cpu() -> bool:
    """An x86-64 CPU with AVX2 (every such CPU also has FMA and F16C)."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2", "AVX512")


def disabled() -> bool:
    return os.environ.get("DSMR_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def load(verbose: bool = False) -> bool:
    """Build (once per machine) and load the kernels; False, with one warning, where they cannot be."""
    if _state["loaded"]:
        return True
    if _state["error"] is not None or disabled():
        return False
    if not supported_cpu():
        _state["error"] = f"this CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}) lacks AVX2"
        return False
    try:
        from torch.utils.cpp_extension import load as build

        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        with build_lock(folder), _one_ninja():
            source = folder / SOURCE.name  # built from a copy: every checkout's build commands are the same
            if not source.exists() or source.read_bytes() != SOURCE.read_bytes():
                shutil.copyfile(SOURCE, source)
            building, start = not built(), time.monotonic()
            if building:
                print("dsmr: building the CPU decoding kernels (once for this dsmr and torch; 1-4 minutes, "
                      "longer on a busy machine)...", file=sys.stderr, flush=True)
            build(name=NAME, sources=[str(source)], is_python_module=False, verbose=verbose,
                  build_directory=str(folder), extra_cflags=list(CFLAGS))
            if building:
                print(f"dsmr: the CPU decoding kernels are built ({time.monotonic() - start:.0f} s)",
                      file=sys.stderr, flush=True)
    except Exception as e:  # no compiler, no ninja, a read-only cache...: decoding still works, slower
        _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(f"dsmr: the CPU decoding kernels could not be built ({_state['error']}); decoding uses "
                      f"PyTorch's kernels (slower). Set DSMR_KERNELS=0 to skip trying.", RuntimeWarning,
                      stacklevel=2)
        return False
    _register_fakes()
    _state["loaded"] = True
    return True


def build_directory() -> Path:
    """Where the kernels are built, under TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions: one folder per
    torch, Python and `build_key()` (a changed source, compiler or torch builds anew; nothing else does)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    version = torch.__version__.replace("+", "_")
    return Path(root) / f"{NAME}-torch{version}-py{sys.version_info.major}{sys.version_info.minor}-{build_key()}"


def build_key() -> str:
    """12 hex digits of what a build is made from: the source's content, the compiler (its --version), torch,
    Python and the flags."""
    parts = [SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(), " ".join(CFLAGS).encode(),
             _compiler_identity().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _compiler_identity() -> str:
    compiler = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return compiler  # no compiler: the build itself says so
    return f"{shutil.which(compiler) or compiler} {out.splitlines()[0] if out else ''}"


@contextlib.contextmanager
def _one_ninja():
    """The same ninja whatever the PATH: the `ninja` package of this Python when it has one (a venv's ninja
    and the system's write build files the other cannot read, so switching between them rebuilt every time),
    else the one on PATH."""
    try:
        import ninja

        first = str(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = first + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def needs_build() -> bool:
    """Whether `load()` would build the kernels now (about a minute): not loaded or given up in this process,
    not switched off, a supported CPU, and no build from an earlier process."""
    return (not _state["loaded"] and _state["error"] is None and not disabled() and supported_cpu()
            and not built())


def built() -> bool:
    """Whether an earlier process built the kernels for this torch (loading them is then quick)."""
    return (build_directory() / f"{NAME}.so").exists()


class BuildLockTimeout(RuntimeError):
    pass


@contextlib.contextmanager
def build_lock(folder: Path, wait_seconds: float = BUILD_WAIT_SECONDS):
    """Hold the right to build in `folder`. torch's own build lock is a plain file that waits without end and
    stays behind when its process is killed; dsmr builds only while holding an flock on `dsmr-build.flock`,
    which the system releases when its holder dies. So whoever holds the flock knows that a torch lock
    left in the folder belongs to nobody, and removes it. Another process building: wait up to
    `wait_seconds`, then BuildLockTimeout (decoding goes on without the kernels)."""
    import fcntl

    with open(folder / "dsmr-build.flock", "a+") as handle:
        deadline = time.monotonic() + wait_seconds
        said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:  # a silent wait looks like a hang
                    print(f"dsmr: another process is building or loading the CPU decoding kernels in {folder}; "
                          f"waiting for it (at most {wait_seconds / 60:.0f} minutes)...", file=sys.stderr, flush=True)
                    said = True
                if time.monotonic() > deadline:
                    raise BuildLockTimeout(f"another process has been building the kernels in {folder} for "
                                           f"over {wait_seconds:.0f} s") from None
                time.sleep(0.2)
        try:
            stale = folder / "lock"
            if stale.exists():
                print(f"dsmr: removing a build lock left by a killed build ({stale})", file=sys.stderr, flush=True)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def loaded() -> bool:
    """Whether the kernels are in use in this process (never builds them)."""
    return _state["loaded"] and _state["enabled"]


def set_enabled(enabled: bool) -> bool:
    """Use the loaded kernels or not (benchmarks and tests compare both paths); returns the old setting.
    Decoders built before a change keep the state dtype they chose (a compiled step recompiles: its graph is
    guarded on this setting)."""
    old = _state["enabled"]
    _state["enabled"] = bool(enabled)
    return old


def load_error() -> str | None:
    """Why `load()` failed, or None."""
    return _state["error"]


def _register_fakes() -> None:
    # shapes and dtypes for torch.compile's tracing
    @torch.library.register_fake("dsmr::half_linear")
    def _(x, packed, out):
        return x.new_empty((*x.shape[:-1], out))

    @torch.library.register_fake("dsmr::int8_linear")
    def _(x, packed, scale, out):
        return x.new_empty((*x.shape[:-1], out))

    @torch.library.register_fake("dsmr::decode_attention")
    def _(q, k, v, mask, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


def pack_half(weight: torch.Tensor) -> torch.Tensor | None:
    """A float16 weight [out, in] in half_linear's layout [ceil(out / 8), in / 8, 8, 8] (block b, chunk c,
    row j = weight[8b + j, 8c : 8c + 8]; missing rows zero): each block of eight output rows is one
    sequential run of memory. None when `in` is not a multiple of 8."""
    return _pack(weight.detach().to(torch.float16))


def pack_int8(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An int8 weight [out, in] and its float32 row scales [out] in int8_linear's layout: blocks of eight
    rows as in pack_half but by sixteen inputs ([ceil(out / 8), in / 16, 8, 16], for 16-wide integer
    multiply-adds), the scales padded with zeros to the packed rows. None when `in` is not a multiple of 16."""
    if weight.dtype != torch.int8 or (weight.numel() and int(weight.min()) < -127):
        # -128 would let int8_linear's int32 sums overflow (its bound assumes |w| <= 127)
        raise ValueError(f"pack_int8: int8 weights in [-127, 127] expected, got {weight.dtype}")
    packed = _pack(weight.detach(), 16)
    if packed is None:
        return None
    return packed, torch.nn.functional.pad(scale.detach().float(), (0, (-weight.shape[0]) % 8)).contiguous()


def _pack(w: torch.Tensor, width: int = 8) -> torch.Tensor | None:
    out, inputs = w.shape
    if inputs % width:
        return None
    w = torch.nn.functional.pad(w, (0, 0, 0, (-out) % 8))
    return w.view(-1, 8, inputs // width, width).permute(0, 2, 1, 3).contiguous()


def half_linear(x: torch.Tensor, packed: torch.Tensor, out: int) -> torch.Tensor:
    """x [..., in] float32 @ weight.T for a weight [out, in] packed by `pack_half`: float32 [..., out],
    summed in float32."""
    return torch.ops.dsmr.half_linear(x, packed, out)


def decode_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """softmax(q k^T scale + mask) v for q [B, H, 1, D] float32, k/v [B, H, N, D] float16/float32 and an
    additive float32 mask broadcastable to [B, H, 1, N] (keys masked with -inf get no weight; runs of them
    are skipped unread). A row with every key masked gives zeros, as PyTorch's SDPA does."""
    return torch.ops.dsmr.decode_attention(q, k, v, mask, scale)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out: int) -> torch.Tensor:
    """x [..., in] float32 @ (weight * scale[:, None]).T for an int8 weight [out, in] packed by `pack_int8`:
    float32 [..., out]. Each row of x rounded to int16 (2^-14 of its largest |x| or finer up to in = 1024,
    coarser beyond: int32 sums must not overflow), then exact integer sums: a row gives the same alone or
    among others."""
    return torch.ops.dsmr.int8_linear(x, packed, scale, out)


def decode_step(ids, embedding, weights, keys, values, memory_fill, t: int, cos, sin, n_heads: int, ff_dim: int,
                rmsnorm: bool, eps: float) -> torch.Tensor:
    """The whole one-token step of a model with packed float16 or int8 weights: ids [B] -> float32 logits
    [B, vocab]. `weights`: per layer the fields `step_fields()` names, then the head's (built by
    dsmr.backends.cpu.fused). Each layer's key/value is written in place at slot memory_fill[l] + t of
    keys[l] / values[l] [B, H, h_l + T, D] (float16 or float32), and attention runs over the slots up to it.
    cos/sin: the segment's rotary table [.., T, r]."""
    return torch.ops.dsmr.decode_step(ids, embedding, weights, keys, values, memory_fill, t, cos, sin, n_heads, ff_dim,
                                      rmsnorm, eps)


def step_fields() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of decode_step's weights, in the order it takes them: (per layer, then the head)."""
    layer, head = torch.ops.dsmr.step_fields().split(";")
    return tuple(layer.split(",")), tuple(head.split(","))


def usable_for(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a kernel may take these inputs: loaded, CPU, float32 activations, float16 or float32 operands
    (weights, keys, values), no autograd."""
    return (loaded() and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and all(t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32) for t in tensors))
