#!/usr/bin/env python3
"""A pure-Python safetensors reader (the checks safetensors.safe_open makes), used by the tests where
the safetensors package is absent: prints one line per tensor, "<key> <dtype> <shape> <byte sum>"."""
import json
import struct
import sys

WIDTH = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}

def main(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    buf = data[8 + n:]
    header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    at = 0
    for key, info in entries:
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if begin != at or end - begin != numel * WIDTH[info["dtype"]]:
            sys.exit("%s: bad data_offsets for %s" % (path, key))
        at = end
        print(key, info["dtype"], info["shape"], sum(buf[begin:end]))
    if at != len(buf):
        sys.exit("%s: the tensors cover %d of %d data bytes" % (path, at, len(buf)))

if __name__ == "__main__":
    main(sys.argv[1])
