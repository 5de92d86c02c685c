"""Configs: every field of every stage's config is checked however the config is built."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal, get_args, get_origin

import pytest

from qless.config import Config, from_dict, merge, parse_overrides, to_dict
from qless.errors import ConfigError


def _configs() -> list[type]:
    import qless.pipeline  # noqa: F401 - imports every stage's config
    from qless.embedded import BenchmarkConfig  # noqa: F401

    out, todo = [], list(Config.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return sorted(out, key=lambda c: c.__name__)


def _fields(kind):
    for cls in _configs():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if kind(tp):
                yield pytest.param(cls, f.name, tp, id=f"{cls.__name__}.{f.name}")


def _minimal(cls, name: str = "") -> dict:
    """Fields without which a config cannot be built at all (LoRIF-only scoring fields need its method)."""
    if cls.__name__ == "RunConfig":
        return {"pool": ("p.jsonl",), "targets": ("t.jsonl",)}
    if cls.__name__ == "ScoreConfig" and name in ("normalize", "curvature", "damping"):
        return {"method": "lorif"}
    return {}


def test_every_stage_config_is_checked():
    names = {c.__name__ for c in _configs()}
    assert names >= {"DataConfig", "ModelConfig", "AdapterConfig", "WarmupConfig", "ProjectionConfig", "ExtractConfig",
                     "ScoreConfig", "SelectConfig", "RunConfig", "BenchmarkConfig"}


@pytest.mark.parametrize("cls,name,tp", list(_fields(lambda tp: get_origin(tp) is Literal)))
def test_unknown_choice_is_refused_not_replaced(cls, name, tp):
    """An unknown choice used to fall back silently (random selection, mean aggregation, linear
    schedule, float32 projection); now every Literal is checked when the config is built."""
    with pytest.raises(ConfigError, match=rf"{cls.section}\.{name}: 'bogus' is not one of"):
        cls(**_minimal(cls, name), **{name: "bogus"})
    for choice in get_args(tp):
        assert getattr(cls(**_minimal(cls, name), **{name: choice}), name) == choice


@pytest.mark.parametrize("cls,name,tp", list(_fields(lambda tp: tp is float)))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "nan", True])
def test_numbers_must_be_finite_numbers(cls, name, tp, bad):
    with pytest.raises(ConfigError, match=rf"{cls.section}\.{name}: expected a"):
        cls(**_minimal(cls), **{name: bad})


@pytest.mark.parametrize("cls,name,tp", list(_fields(lambda tp: tp is int)))
def test_integers_must_be_integers(cls, name, tp):
    with pytest.raises(ConfigError, match=rf"{cls.section}\.{name}: expected an integer"):
        cls(**_minimal(cls), **{name: 2.5})


def test_nested_sections_become_their_config():
    from qless.models import ModelConfig
    from qless.pipeline import RunConfig

    cfg = RunConfig(pool=["p.jsonl"], targets=["t.jsonl"], model={"model": "org/name", "dtype": "bfloat16"})
    assert isinstance(cfg.model, ModelConfig) and cfg.model.dtype == "bfloat16" and cfg.pool == ("p.jsonl",)
    with pytest.raises(ConfigError, match=r"run\.model\.dtype: 'float64' is not one of"):
        RunConfig(pool=["p.jsonl"], targets=["t.jsonl"], model={"dtype": "float64"})


def test_dashed_keys_and_round_trip():
    from qless.training import WarmupConfig

    cfg = from_dict(WarmupConfig, {"learning-rate": 1e-4, "micro_batch_size": 4})
    assert cfg.learning_rate == 1e-4 and cfg.micro_batch_size == 4
    assert from_dict(WarmupConfig, to_dict(cfg)) == cfg


def test_overrides():
    assert parse_overrides(["warmup.epochs=2", "targets=[a.jsonl, b.jsonl]", "model.trust_remote_code=true",
                            "select.percent=0.5"]) == {
        "warmup": {"epochs": 2}, "targets": ["a.jsonl", "b.jsonl"], "model": {"trust_remote_code": True},
        "select": {"percent": 0.5}}
    for bad in ("warmup.epochs", "=2", "warmup..epochs=2"):
        with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
            parse_overrides([bad])
    assert merge({"warmup": {"epochs": 4, "seed": 1}}, parse_overrides(["warmup.epochs=2"])) == {"warmup": {"epochs": 2, "seed": 1}}
