"""One recipe: `DSMRConfig()`, `dsmr train` and `dsmr study` build the same model unless told otherwise, and
old run folders and studies keep the values they were trained with."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from dsmr.cli import build_parser
from dsmr.cli import study as study_cli
from dsmr.cli import train as train_cli
from dsmr.errors import DsmrError
from dsmr.model.config import LEGACY_DEFAULTS, DSMRConfig
from dsmr.study import PRESETS, StudyConfig, default_variants, preset_config, train_config
from dsmr.study.variants import comparable
from dsmr.training.config import TrainConfig, make_model_config

VOCAB = 359


def model_fields(cfg: DSMRConfig, *skip: str) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}


def test_dsmr_train_builds_dsmrconfigs_default_model():
    args = build_parser().parse_args(["train", "--cache", "c", "--out", "o"])
    cli_cfg = TrainConfig(**train_cli._explicit_options(args))
    assert cli_cfg == TrainConfig()
    # everything but the horizons, which come from the run's schedule
    assert model_fields(make_model_config(cli_cfg, VOCAB), "horizons") == \
        model_fields(DSMRConfig(vocab_size=VOCAB), "horizons")


def test_dsmr_study_builds_the_same_recipe_at_the_studys_size():
    args = build_parser().parse_args(["study"])
    cfg = study_cli._config(args)
    assert cfg == StudyConfig()
    for variant in default_variants(cfg):
        if variant.name == "excerpt":
            continue  # no memory, so no memory representation to agree on
        built = make_model_config(train_config(cfg, variant), VOCAB)
        same_size = DSMRConfig(vocab_size=VOCAB, n_layers=cfg.layers, d_model=cfg.d_model, n_heads=cfg.heads,
                               horizons=built.horizons, gate=built.gate, gate_init=built.gate_init)
        assert built == same_size, variant.name


def test_the_recipe_is_an_untied_head_fan_in_init_and_one_memory_everywhere():
    model = DSMRConfig(vocab_size=VOCAB, d_model=128)
    assert model.tie_embeddings is False and math.isclose(model.init_std, 1 / math.sqrt(128))
    assert TrainConfig().memory == StudyConfig().memory == model.memory


def test_the_first_study_is_a_named_preset_and_options_given_override_it():
    args = build_parser().parse_args(["study", "--preset", "first-study", "--steps", "100"])
    cfg = study_cli._config(args)
    assert (cfg.tie_embeddings, cfg.init_std, cfg.memory, cfg.steps) == (True, 0.02, "kv", 100)
    assert cfg.eval_every == PRESETS["first-study"]["eval_every"]
    with pytest.raises(DsmrError, match="unknown study preset"):
        preset_config("nope")


def test_old_model_configs_load_with_the_values_they_were_trained_with():
    saved = model_fields(DSMRConfig(vocab_size=VOCAB))
    for key in LEGACY_DEFAULTS:
        del saved[key]
    old = DSMRConfig.from_dict(saved)
    assert (old.tie_embeddings, old.init_std, old.memory) == (True, 0.02, "kv")


def test_old_study_files_compare_as_the_old_recipe_and_the_default_init_as_its_value():
    old_file = {k: v for k, v in StudyConfig(**PRESETS["first-study"]).to_dict().items()
                if k not in ("tie_embeddings", "init_std", "memory", "head_dim", "curriculum", "epochs", "test")}
    assert comparable(old_file) == comparable(preset_config("first-study").to_dict())
    spelled = dataclasses.replace(StudyConfig(), init_std=1 / math.sqrt(128))
    assert comparable(spelled.to_dict()) == comparable(StudyConfig().to_dict())
    assert comparable(StudyConfig().to_dict()) != comparable(preset_config("first-study").to_dict())


def test_the_package_exposes_its_main_names():
    import dsmr

    for name in dsmr.__all__:
        assert getattr(dsmr, name) is not None, name
    from dsmr import DSMR, DSMRConfig as Config

    model = DSMR(Config(vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=2))
    assert model.cfg.tie_embeddings is False


def test_dsmr_generate_and_the_app_play_with_the_same_defaults_and_refuse_the_same_values():
    import inspect

    from dsmr.generation import defaults
    from dsmr.app.continuation import check_request, generate_variations

    args = build_parser().parse_args(["generate", "R", "--out", "o.mid"])
    page = {k: p.default for k, p in inspect.signature(generate_variations).parameters.items()}
    for name in ("min_pitch", "max_pitch"):
        assert getattr(args, name) == page[name] == getattr(defaults, name.upper()), name
    # temperature and top-p: None on both sides means the model's own (dsmr.generation.defaults.sampling_defaults)
    assert args.temperature is None and page["temperature"] is None and args.top_p is None and page["top_p"] is None
    # the guard: None on both sides means dsmr.generation.defaults's values (dsmr.generation.note_guard.guard_for)
    assert args.max_note_seconds is None and page["max_note_seconds"] is None
    assert args.max_polyphony is None and page["max_polyphony"] is None
    too_hot = defaults.MAX_TEMPERATURE + 1
    # (CLI options, the app's request: temperature, top-p, lowest and highest pitch), each refused by both
    for cli, page in [(["--temperature", str(too_hot)], (too_hot, 0.9, 21, 108)),
                      (["--temperature", "-0.5"], (-0.5, 0.9, 21, 108)),
                      (["--top-p", "0"], (1.0, 0.0, 21, 108)), (["--top-p", "1.5"], (1.0, 1.5, 21, 108)),
                      (["--min-pitch", "-1"], (1.0, 0.9, -1, 108)), (["--max-pitch", "128"], (1.0, 0.9, 21, 128))]:
        assert build_parser_refuses(["generate", "R", "--out", "o.mid", *cli]), cli
        with pytest.raises(DsmrError):
            check_request(10, 30, page[0], page[1], 1, page[2], page[3])


def build_parser_refuses(argv) -> bool:
    from dsmr.cli import main

    return main(argv) == 2


def test_a_model_folder_names_its_own_temperature_and_top_p_and_bad_values_are_refused(tmp_path):
    from dsmr.generation import defaults
    from dsmr.app.models import local_playing_settings

    assert defaults.sampling_defaults(None) == {"temperature": defaults.TEMPERATURE, "top_p": defaults.TOP_P}
    own = {"playing": {"temperature": 1.05}}
    assert defaults.sampling_defaults(own) == {"temperature": 1.05, "top_p": defaults.TOP_P}
    assert defaults.sampling_defaults(own, temperature=0.7, top_p=0.5) == {"temperature": 0.7, "top_p": 0.5}
    for bad in ({"temperature": "hot"}, {"top_p": 0}, {"temperature": defaults.MAX_TEMPERATURE + 1}, [1.0]):
        with pytest.raises(DsmrError, match="playing"):
            defaults.sampling_defaults({"playing": bad})
    (tmp_path / "config.json").write_text(json.dumps(own))
    assert local_playing_settings(tmp_path)["temperature"] == 1.05
    missing = local_playing_settings(tmp_path / "missing")
    assert {k: missing[k] for k in ("temperature", "top_p")} == defaults.sampling_defaults(None)

