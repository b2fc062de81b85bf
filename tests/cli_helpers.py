"""Shared assertion for the scripts' promise: bad input gives one line on stderr and exit status 2."""

import pytest

import prepare_data


def one_line_error(capsys, argv, *needles):
    """Run prepare_data.py with `argv`; assert exit 2 and one stderr line containing every needle."""
    with pytest.raises(SystemExit) as e:
        prepare_data.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
