"""The DSMR model's hyperparameters, declared once (DSMRConfig). Its defaults are the recipe the project
adopted from its measurements (docs/training.md): a separate output head, initial weights of std
1/sqrt(d_model), and the memory representation in DEFAULT_MEMORY. `dsmr train` and `dsmr study` take their
model defaults from here.

Standard library only: command-line parsers import it, and `dsmr --help` must not import torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Optional

from dsmr.core.configs import dataclass_from_dict
from dsmr.errors import DsmrError

GATES = ("none", "soft", "ste")
NORMS = ("layernorm", "rmsnorm")
MEMORIES = ("kv", "hidden")
# What the recurrent state holds in training (both compute the same thing at inference). Keys and values:
# at the adopted recipe hidden memory was not better beyond the seed spread, and trains slower with a
# higher peak (docs/training.md).
DEFAULT_MEMORY = "kv"
# The largest sizes a config may give (a config.json is untrusted input: 1e6 would allocate terabytes).
SIZE_LIMITS = {"vocab_size": 2**20, "n_layers": 256, "d_model": 16384, "n_heads": 256, "d_ff": 262144,
               "head_dim": 4096}
MAX_HORIZON = 2**22
# The values of models saved before a field existed or before its default changed: a config.json "model"
# section without the key was trained with these.
LEGACY_DEFAULTS = {"tie_embeddings": True, "head_dim": None, "rotary_fraction": 1.0, "init_std": 0.02,
                   "memory": "kv"}


@dataclass
class DSMRConfig:
    vocab_size: int
    n_layers: int = 6
    d_model: int = 256
    n_heads: int = 4
    d_ff: Optional[int] = None  # None: 4 * d_model
    dropout: float = 0.0
    rope_base: float = 10000.0
    tie_embeddings: bool = False  # a separate output head (docs/training.md)
    horizons: Optional[tuple[int, ...]] = None  # None: (0,) * n_layers; usually Schedule.horizons
    gate: str = "none"  # "none" | "soft" | "ste"
    gate_per_head: bool = False
    gate_init: float = 3.0  # theta at init: sigmoid(3) ~ 0.95, memory open
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    # Fields added later: their defaults reproduce models saved before them.
    head_dim: Optional[int] = None  # None: d_model // n_heads; attention width = n_heads * head_dim
    rotary_fraction: float = 1.0  # share of each head's dims that the rotary embedding rotates
    # std of the initial weights (residual projections: / sqrt(2 n_layers)); None: 1 / sqrt(d_model)
    init_std: Optional[float] = None
    memory: str = DEFAULT_MEMORY  # what the state holds in training: "kv" keys/values, "hidden" layer inputs

    def __post_init__(self) -> None:
        if self.horizons is None:
            self.horizons = (0,) * self.n_layers if isinstance(self.n_layers, int) else ()
        if isinstance(self.horizons, (str, bytes)) or not all(isinstance(h, int) and not isinstance(h, bool)
                                                              for h in self.horizons):
            raise DsmrError(f"model config: horizons must be whole numbers, got {self.horizons!r:.80}")
        self.horizons = tuple(int(h) for h in self.horizons)
        problems = []
        # sizes a model folder (untrusted input) may ask for: checked before anything is allocated
        for name, high in SIZE_LIMITS.items():
            value = getattr(self, name)
            if value is None and name in ("d_ff", "head_dim"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                problems.append(f"{name} must be a whole number in [1, {high}], got {value!r:.40}")
        if any(h > MAX_HORIZON for h in self.horizons):
            problems.append(f"horizons must be at most {MAX_HORIZON}, got {max(self.horizons)}")
        if not problems and self.head_dim is None:
            if self.d_model % self.n_heads:
                problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads} "
                                f"(or give head_dim)")
            else:
                self.head_dim = self.d_model // self.n_heads
        if not problems and (not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2):
            problems.append(f"head dim must be an even integer >= 2 for the rotary embedding, got {self.head_dim!r}")
        if not (0.0 < self.rotary_fraction <= 1.0) or (isinstance(self.head_dim, int) and self.rotary_dims < 2):
            problems.append(f"rotary_fraction must be in (0, 1] and rotate at least 2 dims of each head, "
                            f"got {self.rotary_fraction}")
        if self.init_std is None and isinstance(self.d_model, int) and self.d_model > 0:
            self.init_std = fan_in_std(self.d_model)
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0 and math.isfinite(self.init_std)):
            problems.append(f"init_std must be > 0, got {self.init_std}")
        if self.memory not in MEMORIES:
            problems.append(f"memory must be one of {MEMORIES}, got {self.memory!r}")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            problems.append(f"d_ff must be a positive integer or None, got {self.d_ff!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.n_layers, int) and len(self.horizons) != self.n_layers:
            problems.append(f"{len(self.horizons)} horizons for {self.n_layers} layers")
        if any(h < 0 for h in self.horizons):
            problems.append(f"horizons must be >= 0, got {list(self.horizons)}")
        if self.gate not in GATES:
            problems.append(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.norm not in NORMS:
            problems.append(f"norm must be one of {NORMS}, got {self.norm!r}")
        if problems:
            raise DsmrError("model config: " + "; ".join(problems))

    @property
    def attn_dim(self) -> int:
        """Width of the queries, keys and values of all heads together."""
        return self.n_heads * self.head_dim

    @property
    def rotary_dims(self) -> int:
        """Dims of each head that are rotated (even; the rest carry no position)."""
        return int(self.head_dim * self.rotary_fraction) // 2 * 2

    @property
    def state_width(self) -> int:
        """Values stored per memory position and layer in training: keys and values, or the layer input."""
        return 2 * self.attn_dim if self.memory == "kv" else self.d_model

    def state_bytes(self, batch: int = 1, bytes_per_value: int = 4) -> int:
        """Bytes of the recurrent state of `batch` lanes: budget x state_width x bytes per value.
        (Decoding always keeps keys/values: IncrementalDecoder.state_bytes.)"""
        return sum(self.horizons) * self.state_width * bytes_per_value * batch

    def training_bytes(self, batch: int, segment: int, bytes_per_value: int = 2, vocab: bool = True) -> int:
        """What a GPU holds for one training segment of `batch` lanes, analytically: the activations autograd
        keeps for the backward pass plus the recurrent state, at `bytes_per_value` (2: bf16 autocast; the
        logits in float32). Weights, gradients and optimizer state are left out (they do not depend on the
        schedule). Per layer, for T segment tokens and M = h memory positions: the block's input and
        normed input (2 T d), q, k, v (3 T A), keys and values with the memory (2 (M + T) A: what
        attention reads and its backward keeps), the attention output (T A), the MLP's normed input, its
        hidden layer before and after GELU (T d + 2 T F); hidden memory also keeps the normed memory and its
        keys and values (M d + 2 M A). An estimate of what a fused-attention kernel keeps, for comparing
        schedules, not a measurement."""
        d, a, f, t = self.d_model, self.attn_dim, self.ff_dim, segment
        per_token = 0
        for h in self.horizons:
            per_token += 2 * t * d + 3 * t * a + 2 * (h + t) * a + t * a + t * d + 2 * t * f
            if self.memory == "hidden":
                per_token += h * d + 2 * h * a
        values = batch * (per_token + t * d)  # + the embedding output
        logits = batch * t * self.vocab_size * 4 if vocab else 0
        return values * bytes_per_value + logits + self.state_bytes(batch, bytes_per_value)

    @property
    def ff_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    def to_dict(self) -> dict:
        d = asdict(self)
        d["horizons"] = list(self.horizons)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DSMRConfig":
        """From a config.json "model" section; keys it lacks (models saved before a field existed, or
        before its default changed) take their LEGACY_DEFAULTS."""
        if not isinstance(d, dict):
            raise DsmrError(f"model config: expected an object, got {d!r:.40}")
        try:
            return dataclass_from_dict(cls, {**LEGACY_DEFAULTS, **d}, "model config")
        except (TypeError, ValueError) as err:  # "64" for a size, "abc" for a number
            raise DsmrError(f"model config: a value has the wrong type ({err})") from err


def fan_in_std(d_model: int) -> float:
    """The default std of the initial weights, 1 / sqrt(d_model): every config that leaves it unset uses this."""
    return 1.0 / math.sqrt(d_model)


def recipe_default(name: str):
    """The default of a DSMRConfig field: what `dsmr train` and `dsmr study` build unless told otherwise."""
    return next(f.default for f in dataclasses.fields(DSMRConfig) if f.name == name)
