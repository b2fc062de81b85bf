"""Shared assertion for the scripts' promise: bad input gives one line on stderr and exit status 2."""

import pytest

import prepare_data


def one_line_error(capsys, argv, *needles):
    """Run prepare_data.py with `argv`; assert exit 2 and one stderr line containing every needle."""
    script_error(capsys, prepare_data.main, argv, *needles)


def script_error(capsys, fn, argv, *needles):
    """Run a script's ``main(argv)``; assert exit 2 and one stderr line containing every needle; return it."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err
