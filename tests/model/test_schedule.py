"""Horizon schedules: arithmetic, errors, the table, and `dsmr schedule show`."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsmr.cli import main
from dsmr.errors import DsmrError
from dsmr.model.schedule import Schedule, make_schedule


def test_two_scale_paper_setting():
    s = make_schedule("two-scale", 6, budget=2560, long_layers=2, short=128)
    assert s.name == "two-scale"
    assert s.horizons == (1024, 1024, 128, 128, 128, 128)
    assert s.budget == 2560 and s.n_layers == 6
    assert make_schedule("two_scale", 6, budget=2560, long_layers=2, short=128) == s
    # every layer long: the short horizon plays no part
    assert make_schedule("two-scale", 4, budget=400, long_layers=4, short=128).horizons == (100,) * 4


def test_full_none_explicit():
    assert make_schedule("full", 3, horizon=512).horizons == (512, 512, 512)
    assert make_schedule("full", 3, horizon=512).budget == 1536
    assert make_schedule("none", 4).horizons == (0, 0, 0, 0)
    assert make_schedule("none", 4).budget == 0
    assert make_schedule("explicit", 3, horizons=[5, 0, 7]).horizons == (5, 0, 7)


def test_uniform_gives_the_remainder_to_the_lowest_layers():
    assert make_schedule("uniform", 6, budget=2560).horizons == (427, 427, 427, 427, 426, 426)
    assert make_schedule("uniform", 4, budget=400).horizons == (100,) * 4


def test_binary_shares_the_budget_among_the_chosen_layers():
    s = make_schedule("binary", 6, budget=2560, layers=[4, 1])
    assert s.horizons == (0, 1280, 0, 0, 1280, 0)
    assert make_schedule("binary", 4, budget=10, layers={0, 2, 3}).horizons == (4, 0, 3, 3)


@given(st.integers(1, 12), st.integers(0, 100_000))
def test_uniform_and_binary_spend_exactly_the_budget(n_layers, budget):
    u = make_schedule("uniform", n_layers, budget=budget)
    assert u.budget == budget and max(u.horizons) - min(u.horizons) <= 1
    chosen = list(range(0, n_layers, 2))
    b = make_schedule("binary", n_layers, budget=budget, layers=chosen)
    assert b.budget == budget
    assert all(h == 0 for i, h in enumerate(b.horizons) if i not in chosen)


def test_state_bytes():
    s = make_schedule("two-scale", 6, budget=2560, long_layers=2, short=128)
    assert s.state_bytes(256) == 2 * 2560 * 256 * 4 == 5_242_880
    assert s.state_bytes(256, bytes_per_value=2) == 2_621_440
    assert s.state_bytes(256, 2, batch=8) == 8 * 2_621_440
    assert make_schedule("none", 6).state_bytes(256) == 0


def test_schedule_state_bytes_equals_the_model_config_under_its_assumptions():
    from dsmr.model.config import DSMRConfig

    s = make_schedule("two-scale", 6, budget=2560, long_layers=2, short=128)
    cfg = DSMRConfig(vocab_size=40, n_layers=6, d_model=256, n_heads=4, horizons=s.horizons, memory="kv")  # width 256
    assert cfg.state_bytes(8, 2) == s.state_bytes(256, 2, batch=8)


@pytest.mark.parametrize(
    "kind, kw, message",
    [
        ("wide", {}, "unknown schedule"),
        ("two-scale", dict(budget=2561, long_layers=2, short=128), "does not split"),
        ("two-scale", dict(budget=300, long_layers=2, short=128), "does not split"),  # 300 - 512 < 0
        ("two-scale", dict(budget=560, long_layers=2, short=128), "shorter than the short"),  # (560 - 512) / 2 = 24
        ("two-scale", dict(budget=2560, long_layers=0, short=128), "long_layers"),
        ("two-scale", dict(budget=2560, long_layers=7, short=128), "long_layers"),
        ("two-scale", dict(budget=2560, short=128), "needs long_layers"),
        ("uniform", {}, "needs budget"),
        ("uniform", dict(budget=-1), "budget"),
        ("full", {}, "needs horizon"),
        ("full", dict(horizon=-5), "horizon"),
        ("binary", dict(budget=100), "needs layers"),
        ("binary", dict(budget=100, layers=[]), "empty"),
        ("binary", dict(budget=100, layers=[0, 6]), "outside"),
        ("explicit", dict(horizons=[1, 2]), "2 horizons given for 6 layers"),
        ("explicit", dict(horizons=[1, 2, 3, 4, 5, -6]), "layer 5"),
    ],
)
def test_inconsistent_arguments_raise(kind, kw, message):
    with pytest.raises(DsmrError, match=message):
        make_schedule(kind, 6, **kw)


def test_schedule_validates_and_round_trips():
    with pytest.raises(DsmrError, match="layer 1"):
        Schedule("explicit", (3, -1))
    with pytest.raises(DsmrError, match="at least one layer"):
        Schedule("explicit", ())
    with pytest.raises(DsmrError):
        make_schedule("none", 0)
    s = make_schedule("binary", 5, budget=99, layers=[1, 3])
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(DsmrError):
        Schedule.from_dict({"horizons": [1]})


def test_table_lists_layers_top_down_with_proportional_bars():
    s = make_schedule("explicit", 3, horizons=[400, 0, 100])
    text = s.table(d_model=256, width=40)
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [r[:2] for r in rows] == [["2", "100"], ["1", "0"], ["0", "400"]]
    assert rows[0][2] == "#" * 10 and rows[1][2] == "." and rows[2][2] == "#" * 40
    assert "budget: 500 KV positions" in text
    assert f"{s.state_bytes(256, 4)} bytes fp32" in text and f"{s.state_bytes(256, 2)} bytes bf16" in text


def test_cli_show_json(capsys):
    code = main(["schedule", "show", "--schedule", "two-scale", "--layers", "6", "--budget", "2560",
                 "--long-layers", "2", "--short", "128", "--d-model", "256", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["horizons"] == [1024, 1024, 128, 128, 128, 128]
    assert out["budget"] == 2560
    assert out["state_bytes"] == {"fp32": 5_242_880, "bf16": 2_621_440}


def test_cli_show_table_other_kinds(capsys):
    assert main(["schedule", "show", "--schedule", "binary", "--memory-layers", "0,3", "--budget", "100"]) == 0
    assert "budget: 100 KV positions" in capsys.readouterr().out
    assert main(["schedule", "show", "--schedule", "explicit", "--layers", "3", "--horizons", "1,2,3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["horizons"] == [1, 2, 3]
    assert main(["schedule", "show", "--schedule", "full", "--horizon", "64", "--layers", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget"] == 128


def test_cli_error_is_one_line_exit_2(capsys):
    assert main(["schedule", "show", "--budget", "2561"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsmr schedule: error: schedule 'two-scale'") and err.count("\n") == 1


def test_cli_plot_writes_a_png(tmp_path, capsys):
    out = tmp_path / "fig" / "schedule.png"
    assert main(["schedule", "show", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name != "schedule.png"]  # no temp file left
    assert main(["schedule", "show", "--plot", str(tmp_path / "x.nope")]) == 2
    assert "unknown figure format" in capsys.readouterr().err
