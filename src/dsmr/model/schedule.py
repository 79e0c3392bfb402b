"""Horizon schedules: how a recurrent-state budget is spread over the layers (docs/design.md).

Layer `l` keeps the keys/values of its last `h_l` positions before the current segment. The budget is
`B = sum_l h_l` KV positions; the state costs `2 * B * d_model * bytes_per_value * batch` bytes.

Kinds (`make_schedule`):

    full       every layer `horizon`                      (the full-memory reference, budget L * horizon)
    uniform    budget // L per layer; the remainder goes one position each to the lowest layers
    two-scale  the lowest `long_layers` layers h_long, the others `short`; h_long solves
               k * h_long + (L - k) * short = budget and must be an integer >= short
    binary     the layers in `layers` share the budget equally (remainder to the lowest of them), others 0
    none       0 everywhere (segment-local attention)
    explicit   `horizons`, one per layer
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from dsmr.errors import DsmrError

KINDS = ("full", "uniform", "two-scale", "binary", "none", "explicit")
_ALIASES = {"two_scale": "two-scale", "twoscale": "two-scale", "list": "explicit"}


@dataclass(frozen=True)
class Schedule:
    name: str
    horizons: tuple[int, ...]  # h_l for l = 0 (lowest) .. L-1

    def __post_init__(self) -> None:
        horizons = tuple(self.horizons)
        if not horizons:
            raise DsmrError(f"schedule {self.name!r}: needs at least one layer")
        for layer, h in enumerate(horizons):
            # bool is an int subclass; a True horizon is always a mistake
            if isinstance(h, bool) or not isinstance(h, int) or h < 0:
                raise DsmrError(f"schedule {self.name!r}: horizon of layer {layer} must be an integer >= 0, got {h!r}")
        object.__setattr__(self, "horizons", horizons)

    @property
    def budget(self) -> int:
        """Total recurrent state in KV positions: sum of the horizons."""
        return sum(self.horizons)

    @property
    def n_layers(self) -> int:
        return len(self.horizons)

    def state_bytes(self, d_model: int, bytes_per_value: int = 4, batch: int = 1) -> int:
        """Bytes of the recurrent state before a model exists: keys and values (2) of every budgeted position,
        each d_model wide. This assumes key/value memory (`memory="kv"`) and an attention width equal to
        d_model (the default head_dim); for a built model use DSMRConfig.state_bytes, which also covers
        other head dims and hidden memory (and equals this under those assumptions)."""
        return 2 * self.budget * d_model * bytes_per_value * batch

    def to_dict(self) -> dict:
        return {"name": self.name, "horizons": list(self.horizons), "budget": self.budget}

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        try:
            return cls(name=str(d["name"]), horizons=tuple(d["horizons"]))
        except (KeyError, TypeError) as err:
            raise DsmrError(f"schedule: expected {{'name', 'horizons'}}, got {d!r}") from err

    def table(self, d_model: int | None = None, width: int = 40) -> str:
        """A text table, one row per layer (highest first, as a network is drawn), with a bar per horizon."""
        top = max(self.horizons) or 1
        lines = [f"schedule {self.name}: {self.n_layers} layers, budget {self.budget} positions", ""]
        lines.append(f"{'layer':>5}  {'horizon':>8}")
        for layer in reversed(range(self.n_layers)):
            h = self.horizons[layer]
            bar = "#" * round(width * h / top) if h else "."
            lines.append(f"{layer:>5}  {h:>8}  {bar}")
        lines.append("")
        lines.append(f"budget: {self.budget} KV positions")
        if d_model is not None:
            fp32 = self.state_bytes(d_model, 4)
            bf16 = self.state_bytes(d_model, 2)
            lines.append(
                f"state per lane (d_model {d_model}): {fp32} bytes fp32 ({_human(fp32)}), "
                f"{bf16} bytes bf16 ({_human(bf16)})"
            )
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _need(kind: str, **values) -> None:
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise DsmrError(f"schedule {kind!r} needs {', '.join(missing)}")


def _non_negative(kind: str, name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DsmrError(f"schedule {kind!r}: {name} must be an integer >= 0, got {value!r}")
    return value


def _share(total: int, n: int) -> list[int]:
    """`total` split into `n` near-equal integers, the remainder one each to the first (lowest) entries."""
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def make_schedule(
    kind: str,
    n_layers: int,
    *,
    horizon: int | None = None,
    budget: int | None = None,
    long_layers: int | None = None,
    short: int | None = None,
    layers: Iterable[int] | None = None,
    horizons: Sequence[int] | None = None,
) -> Schedule:
    """Build a schedule of `kind` for `n_layers` layers; DsmrError when the arguments are inconsistent."""
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise DsmrError(f"unknown schedule {kind!r}; expected one of {', '.join(KINDS)}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise DsmrError(f"schedule {kind!r}: n_layers must be an integer >= 1, got {n_layers!r}")
    L = n_layers

    if kind == "none":
        return Schedule(kind, (0,) * L)

    if kind == "full":
        _need(kind, horizon=horizon)
        return Schedule(kind, (_non_negative(kind, "horizon", horizon),) * L)

    if kind == "explicit":
        _need(kind, horizons=horizons)
        hs = tuple(horizons)
        if len(hs) != L:
            raise DsmrError(f"schedule 'explicit': {len(hs)} horizons given for {L} layers")
        return Schedule(kind, tuple(_non_negative(kind, f"horizon of layer {i}", h) for i, h in enumerate(hs)))

    _need(kind, budget=budget)
    budget = _non_negative(kind, "budget", budget)

    if kind == "uniform":
        return Schedule(kind, tuple(_share(budget, L)))

    if kind == "binary":
        return _binary(L, budget, layers)
    return _two_scale(L, budget, long_layers, short)


def _binary(L: int, budget: int, layers) -> Schedule:
    """The budget shared equally by the chosen layers; the others keep nothing."""
    _need("binary", layers=layers)
    chosen = sorted(set(layers))
    if not chosen:
        raise DsmrError("schedule 'binary': the set of memory layers is empty")
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L]
    if bad:
        raise DsmrError(f"schedule 'binary': layers {bad} are outside 0..{L - 1}")
    shares = dict(zip(chosen, _share(budget, len(chosen))))
    return Schedule("binary", tuple(shares.get(i, 0) for i in range(L)))


def _two_scale(L: int, budget: int, long_layers, short) -> Schedule:
    """The lowest `long_layers` share what the others' `short` horizons leave of the budget."""
    kind = "two-scale"
    _need(kind, long_layers=long_layers, short=short)
    k = long_layers
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L:
        raise DsmrError(f"schedule 'two-scale': long_layers must be in 1..{L}, got {k!r}")
    short = _non_negative(kind, "short", short)
    rest = budget - (L - k) * short
    if rest < 0 or rest % k:
        raise DsmrError(
            f"schedule 'two-scale': budget {budget} - {L - k} short layers x {short} = {rest} "
            f"does not split into {k} equal non-negative long horizons"
        )
    h_long = rest // k
    if k < L and h_long < short:
        raise DsmrError(
            f"schedule 'two-scale': long horizon {h_long} is shorter than the short horizon {short} "
            f"(raise the budget or lower --short)"
        )
    return Schedule(kind, (h_long,) * k + (short,) * (L - k))
