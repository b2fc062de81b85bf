"""Config: precedence, generated flags, one-line errors with suggestions, round trip."""

import argparse
import json
import re

import pytest

from config import (
    PRESETS,
    Config,
    ConfigError,
    add_config_flags,
    build_config,
    coerce,
    from_dict,
    parse_config,
    save_config,
    to_dict,
)


def _parser():
    p = argparse.ArgumentParser(prog="t")
    add_config_flags(p)
    return p


def test_every_field_has_a_flag():
    p = _parser()
    flags = {a for action in p._actions for a in action.option_strings}
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in flags


def test_precedence_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: demo\nlr: 0.05\nbatch_size: 32\n")
    cfg, rest = parse_config(_parser(), ["--config", str(f), "--batch-size", "16", "--amp"])
    assert cfg.epochs == PRESETS["demo"]["epochs"]  # from the preset
    assert cfg.lr == 0.05  # file beats preset
    assert cfg.batch_size == 16  # flag beats file
    assert cfg.amp is True
    assert rest.given == {"batch_size": "16", "amp": True}


def test_python_config_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("config = dict(backbone='ir_se50', milestones=[10, 18])\n")
    cfg = build_config(config_file=str(f))
    assert cfg.backbone == "ir_se50" and cfg.milestones == (10.0, 18.0)


def test_unknown_key_suggests_closest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("batch_sise: 8\n")
    with pytest.raises(ConfigError, match="unknown config key 'batch_sise'; did you mean 'batch_size'"):
        build_config(config_file=str(f))


def test_unknown_flag_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(_parser(), ["--batch-sise", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--batch-sise" in err and "--batch-size" in err


@pytest.mark.parametrize("key,value,msg", [
    ("batch_size", "abc", "bad value 'abc' for --batch-size (config key 'batch_size')"),
    ("scheduler", "cosin", "did you mean 'cosine'"),
    ("amp", "maybe", "expected true or false"),
    ("epochs", 2.5, "expected an integer"),
])
def test_bad_values(key, value, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        coerce(key, value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        build_config(preset="dmeo")


def test_save_and_reload_round_trip(tmp_path):
    cfg = build_config(preset="insightface_pytorch_ir_se50", overrides={"head_kwargs": '{"easy_margin": true}'})
    path = tmp_path / "config.json"
    save_config(cfg, str(path))
    again = from_dict(json.loads(path.read_text()))
    assert again == cfg
    assert to_dict(again)["milestones"] == [4.0, 6.0, 7.0]


def test_optional_fields_accept_none():
    assert coerce("scale", "none") is None
    assert coerce("scale", "32") == 32.0
