#!/usr/bin/python3
"""Compares two checkpoint folders' safetensors files (model and optimizer): the same tensors
under the same names, dtypes and shapes, in the same order, and values within relative 1e-5 of
the larger magnitude (a distributed run sums in another order). Exit status 1 on a difference.
usage: compare_checkpoints.py REFERENCE_DIR OTHER_DIR"""
import json
import os
import struct
import sys

TOL = 1e-5
FORMATS = {"F32": ("f", 4), "F64": ("d", 8)}


def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return header, order, data


def values(entry, data):
    fmt, size = FORMATS[entry["dtype"]]
    a, b = entry["data_offsets"]
    return struct.unpack("<%d%s" % ((b - a) // size, fmt), data[a:b])


def main():
    ref_dir, other_dir = sys.argv[1], sys.argv[2]
    for name in ("model.safetensors", "optimizer.safetensors"):
        h1, o1, d1 = read(os.path.join(ref_dir, name))
        h2, o2, d2 = read(os.path.join(other_dir, name))
        if o1 != o2:
            sys.exit(f"{name}: the tensors differ: {o1[:5]}... against {o2[:5]}...")
        worst = 0.0
        for k in o1:
            e1, e2 = h1[k], h2[k]
            if (e1["dtype"], e1["shape"]) != (e2["dtype"], e2["shape"]):
                sys.exit(f"{name}: {k} is {e2['dtype']}{e2['shape']}, not {e1['dtype']}{e1['shape']}")
            v1, v2 = values(e1, d1), values(e2, d2)
            scale = max([abs(x) for x in v1] + [1e-30])
            diff = max([abs(x - y) for x, y in zip(v1, v2)] + [0.0]) / scale
            worst = max(worst, diff)
            if diff > TOL:
                sys.exit(f"{name}: {k} differs by {diff:.3g} (relative to its largest value)")
        print(f"{name}: {len(o1)} tensors match (worst relative difference {worst:.2g})")


if __name__ == "__main__":
    main()
