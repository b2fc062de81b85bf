"""prepare_data.py's subcommand table: each example in `COMMAND --help` parses as written."""

import re
import shlex

import pytest

import prepare_data
from prepare.commands import COMMANDS


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_example_parses_as_written(name):
    """Each example line (a trailing "(...)" remark aside) is a command line the parser accepts."""
    for line in COMMANDS[name].example.splitlines():
        argv = shlex.split(re.sub(r"\s+\(.*\)$", "", line.strip()))
        assert argv[:3] == ["python", "prepare_data.py", name], line
        args = prepare_data.get_args_parser().parse_args(argv[2:])
        assert args.command == name


def test_help_lists_every_command_with_its_summary(capsys):
    with pytest.raises(SystemExit):
        prepare_data.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "unpack-rec Write every image of a .rec pack" in out
    assert "synth Generate synthetic face identities" in out
    for name in ("unpack", "unpack-bin", "pack", "make-bin", "inspect", "align"):
        assert f" {name} " in out
