"""Pure-Python MXNet RecordIO (``.rec`` + ``.idx``), byte-compatible with dmlc-core.

Why our own: the insightface training sets (MS1M, Glint360K, WebFace, CASIA) ship as
RecordIO packs, and mxnet is no longer installable on current Pythons. The format facts
are in ``format.py``; ``reader.py`` and ``writer.py`` build on them.
"""

from data.recordio.format import IR_SIZE, MAGIC, IRHeader, RecordIOError, encode_record, pack_irheader, unpack_irheader
from data.recordio.reader import RecordReader, read_idx, scan_offsets
from data.recordio.writer import RecordWriter

__all__ = ["IR_SIZE", "MAGIC", "IRHeader", "RecordIOError", "RecordReader", "RecordWriter", "encode_record",
           "pack_irheader", "read_idx", "scan_offsets", "unpack_irheader"]
