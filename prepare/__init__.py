"""Offline data tooling behind ``prepare_data.py``: pack, unpack, inspect, align, pairs (make-bin)
and the synthetic generator. Each subcommand's flags live in prepare/commands/. Imports the
formats of data/ and utils/."""
