"""Registry and config errors: duplicates, unknown names, unknown or ill-typed fields."""

import dataclasses
import sys

import pytest

import xformers_zoo as xz
from xformers_zoo import overrides as cfglib
from xformers_zoo.configs import ExperimentConfig, load_config, resolve_config
from xformers_zoo.overrides import ConfigError
from xformers_zoo.registry import Registry, UnknownNameError, import_submodules


def test_registry_duplicate_and_unknown():
    reg = Registry("widget")
    reg.register("a", 1)
    reg.register("b", 2)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 3)
    with pytest.raises(UnknownNameError, match=r"unknown widget 'c'; known: a, b"):
        reg.get("c")
    assert reg.names() == ["a", "b"] and "a" in reg and len(reg) == 2


def test_import_submodules_runs_every_module_of_a_package(tmp_path, monkeypatch):
    """A package's modules register themselves when it imports them: no list names them."""
    package = tmp_path / "gadgets"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from xformers_zoo.registry import Registry, import_submodules\n"
        "GADGETS = Registry('gadget')\n"
        "MODULES = import_submodules(__name__)\n")
    for name in ("beta", "alpha"):
        (package / f"{name}.py").write_text(
            f"from gadgets import GADGETS\n\n@GADGETS.decorator('{name}')\ndef make():\n"
            "    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gadgets

    try:
        assert gadgets.MODULES == ["gadgets.alpha", "gadgets.beta"]
        assert gadgets.GADGETS.names() == ["alpha", "beta"]
        assert import_submodules("gadgets") == gadgets.MODULES  # imported once only
        assert len(gadgets.GADGETS) == 2
    finally:
        for name in ("gadgets", "gadgets.alpha", "gadgets.beta"):
            sys.modules.pop(name, None)


def test_task_facts_are_read_from_the_task_specs():
    from xformers_zoo.data.pathfinder_source import SIZES
    from xformers_zoo.data.sources import split_sizes

    assert SIZES == {"pathfinder32": 32, "pathfinder64": 64, "pathx": 128, "path256": 256}
    assert all(xz.TASKS.get(t).image_shape == (s, s) for t, s in SIZES.items())
    listops = resolve_config("listops").data
    assert (listops.train_size, listops.val_size, listops.test_size) == (96_000, 2_000, 2_000)
    unsized = dataclasses.replace(resolve_config("pathx").data, train_size=None, val_size=None)
    assert split_sizes(unsized) == {"train": 160_000, "validation": 20_000, "test": 20_000}
    with pytest.raises(ValueError, match="text has no published split sizes"):
        split_sizes(dataclasses.replace(resolve_config("text").data, train_size=None))


def test_unknown_model_and_task_list_known_names():
    with pytest.raises(UnknownNameError, match="known: .*full"):
        xz.create_model("no-such-variant")
    with pytest.raises(UnknownNameError, match="known: .*listops"):
        xz.create_model("full", task="no-such-task")


def test_create_model_rejects_unknown_and_ill_typed_fields():
    with pytest.raises(ConfigError, match="unknown field 'num_layer'.*model fields: .*num_layers"):
        xz.create_model("full", num_layer=2)
    with pytest.raises(ConfigError, match="num_layers: expected an integer"):
        xz.create_model("full", num_layers="two")
    with pytest.raises(ConfigError, match="pooling: 'max' is not accepted"):
        xz.create_model("full", pooling="max")


def test_overrides_parse_strings_into_field_types():
    cfg = resolve_config("listops", "full", overrides={
        "train.lr": "0.01", "model.num_layers": "2", "train.grad_clip": "1.0",
        "model.attention.implementation": "xla", "model.remat": "true"})
    assert cfg.train.lr == 0.01 and cfg.model.num_layers == 2 and cfg.train.grad_clip == 1.0
    assert cfg.model.attention.implementation == ("xla",) and cfg.model.remat is True
    assert resolve_config("listops", overrides={"train.grad_clip": "none"}).train.grad_clip is None
    with pytest.raises(ConfigError, match="unknown field 'nope' in TrainConfig; known fields"):
        resolve_config("listops", overrides={"train.nope": 1})
    with pytest.raises(ConfigError, match="'lr'.*not a section"):
        resolve_config("listops", overrides={"train.lr.x": 1})


def test_public_listops_config_values():
    cfg = resolve_config("listops")
    m, t = cfg.model, cfg.train
    assert (m.num_layers, m.num_heads, m.emb_dim, m.qkv_dim, m.mlp_dim) == (4, 8, 512, 512, 1024)
    assert (t.batch_size, t.steps, t.lr, t.warmup_steps, t.weight_decay) == (32, 5000, 0.05,
                                                                               1000, 0.1)
    assert (t.adam_b1, t.adam_b2, t.adam_eps) == (0.9, 0.98, 1e-9)
    assert (cfg.data.train_size, cfg.data.val_size, cfg.data.test_size) == (96000, 2000, 2000)


def test_presets_compose_and_unknown_preset_errors():
    tiny = resolve_config("listops", "full", presets=["tiny"], overrides={"train.steps": 7})
    assert tiny.model.emb_dim == 64 and tiny.train.steps == 7 and tiny.data.max_length == 128
    with pytest.raises(UnknownNameError, match="unknown preset 'huge'; known: .*tiny"):
        resolve_config("listops", presets=["huge"])


def test_config_round_trips_through_dict():
    cfg = resolve_config("listops", "full", presets=["tiny"])
    again = load_config(cfglib.to_dict(cfg))
    assert again == cfg and isinstance(again, ExperimentConfig)
    frozen = dataclasses.FrozenInstanceError
    with pytest.raises(frozen):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_variant_that_cannot_serve_the_length_says_so():
    class Limited:
        def check(self, *, max_length, num_heads, head_dim):
            if max_length > 10:
                raise ConfigError(f"limited serves up to 10 tokens, got {max_length}")

    spec = dataclasses.replace(xz.VARIANTS.get("full"), config_cls=Limited)
    with pytest.raises(ConfigError, match="up to 10 tokens, got 2001"):
        spec.check(Limited(), max_length=2001, num_heads=8, head_dim=64)
    capped = dataclasses.replace(spec, capabilities=xz.Capabilities(max_length=512))
    with pytest.raises(ConfigError, match="accepts sequences up to 512 tokens, got 2001"):
        capped.check(object(), max_length=2001, num_heads=8, head_dim=64)
