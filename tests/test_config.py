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


def test_every_number_has_a_range_and_the_defaults_and_presets_are_in_it():
    import dataclasses
    import typing

    from config import check_config

    for f in dataclasses.fields(Config):
        tp = typing.get_type_hints(Config)[f.name]
        numeric = tp in (int, float) or float in typing.get_args(tp)
        if numeric:
            assert {"min", "gt", "finite"} & set(f.metadata), f"{f.name} has no range in its metadata"
    check_config(Config())
    for name in PRESETS:
        build_config(preset=name)


@pytest.mark.parametrize("key,value,msg", [
    ("lr", float("nan"), "bad value nan for --lr (config key 'lr'): must be a finite number > 0"),
    ("momentum", 1.0, "must be a finite number in [0, 1)"),
    ("embedding_size", 10**9, "must be an integer in [1, 65536]"),
    ("epochs", float("inf"), "expected an integer"),
    ("milestones", [10, -1], "each value must be a finite number >= 0"),
    ("max_bad_fraction", 1.01, "in [0, 1]"),
    ("keep", 0, "must be an integer >= 1"),
    ("output", "  ", "--output (config key 'output') may not be empty"),
])
def test_ranges(key, value, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        coerce(key, value)


def test_edges_of_the_ranges_are_allowed():
    assert coerce("dropout", 0) == 0.0 and coerce("max_bad_fraction", 1) == 1.0 and coerce("sample_rate", 1) == 1.0
    assert coerce("eval_every", -1) == -1 and coerce("embedding_size", 65536) == 65536
    assert coerce("margin", -0.2) == -0.2  # a head's own range is the head's to check


@pytest.mark.parametrize("name,content,needles", [
    ("c.yaml", b"lr: \xff\xfe\x00\x01\n", ["c.yaml", "byte 4", "not UTF-8"]),
    ("c.yaml", b"- lr\n- 0.1\n", ["c.yaml", "holds list", "not a mapping"]),
    ("c.yaml", b"just words\n", ["c.yaml", "holds str 'just words'", "not a mapping"]),
    ("c.yaml", b"lr: [1\n", ["c.yaml", "line 2", "not valid YAML"]),
    ("c.yaml", b"1: 2\n", ["c.yaml", "key 1 is not a name"]),
    ("c.json", b'{"lr": -1}', ["--lr", "> 0"]),
    ("c.py", b"lr = 0.1\nbatch_size = (\n", ["c.py", "line 2", "syntax error"]),
    ("c.py", b"lr = 0.1\nx = 1 / 0\n", ["c.py", "line 2", "raised ZeroDivisionError: division by zero"]),
    ("c.py", b"config = 5\n", ["c.py", "`config` is int 5"]),
])
def test_config_files_that_do_not_parse(tmp_path, name, content, needles):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        build_config(config_file=str(path))
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_config_file_not_a_regular_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a regular config file"):
        build_config(config_file=str(tmp_path))


def test_from_dict_names_the_source():
    with pytest.raises(ConfigError, match=r"^run/config.json: the saved config is str 'lr', not a mapping"):
        from_dict("lr", source="run/config.json")
    with pytest.raises(ConfigError, match=r"^run/config.json: bad value 0 for --batch-size"):
        from_dict({"batch_size": 0}, source="run/config.json")
    assert from_dict({"lr": 0.05, "not_a_field_any_more": 1}).lr == 0.05


def test_parse_config_bad_value_is_one_line_without_usage(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(_parser(), ["--lr", "nan"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "t: error: bad value nan for --lr (config key 'lr'): must be a finite number > 0"
