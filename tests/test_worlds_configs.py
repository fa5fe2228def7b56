"""Every world YAML validates and names an importable World whose setup takes its params."""

from pathlib import Path

import pytest

from scalesim import load_config
from scalesim.config import import_world_class

WORLDS = Path(__file__).resolve().parent.parent / "worlds"
YAMLS = sorted(WORLDS.glob("*.yaml"))


def test_every_world_has_small_and_large_configs():
    names = {p.stem for p in YAMLS}
    for world in ("town", "social_feed", "round_table", "traffic", "outbreak", "market"):
        assert world in names and f"{world}_large" in names
    assert {"town_standard", "social_feed_standard"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_validates_and_its_class_imports(path):
    config = load_config(path)
    cls = import_world_class(config)
    assert set(config.world.params) <= set(cls.parameters())
    assert cls.__module__.split(".")[-1] == path.stem.removesuffix("_large").removesuffix("_standard")
