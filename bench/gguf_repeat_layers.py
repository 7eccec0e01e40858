#!/usr/bin/python3
"""A deeper GGUF model made from a shallower one by repeating its layers: block i of the output is
block i mod L of the input, tensor for tensor and byte for byte (types, quantized blocks), and the
metadata's `{arch}.block_count` says the new depth. For measuring a model of a real depth (the
48-layer Qwen3-30B-A3B in Q4_K_M, about 17 GB) where converting one from a HuggingFace folder would
need several times its size in disk space; the speed and memory of a layer do not depend on its
values.

    /usr/bin/python3 bench/gguf_repeat_layers.py IN.gguf OUT.gguf --layers 48

The format is ggml's docs/gguf.md (version 3): the header's key-value pairs are copied as they are
(block_count rewritten), tensor descriptions re-laid out at offsets aligned to general.alignment
(32 by default), and the tensors' bytes streamed in blocks, so memory stays small whatever the
size. The output is written to OUT.tmp and renamed when complete.
"""
import argparse
import os
import re
import struct
import sys

# Value types of GGUF metadata: the struct format of the fixed-size ones.
FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class Reader:
    def __init__(self, f):
        self.f = f

    def read(self, n):
        b = self.f.read(n)
        if len(b) != n:
            sys.exit("truncated GGUF file")
        return b

    def unpack(self, fmt):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))[0]

    def string(self):
        return self.read(self.unpack("Q"))

    def value_bytes(self, t):
        """The raw bytes of one value of type t (copied as they are)."""
        if t in FIXED:
            return self.read(struct.calcsize("<" + FIXED[t]))
        if t == STRING:
            n = self.unpack("Q")
            return struct.pack("<Q", n) + self.read(n)
        if t == ARRAY:
            et, n = self.unpack("I"), self.unpack("Q")
            head = struct.pack("<IQ", et, n)
            if et in FIXED:
                return head + self.read(n * struct.calcsize("<" + FIXED[et]))
            return head + b"".join(self.value_bytes(et) for _ in range(n))
        sys.exit(f"unknown metadata value type {t}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, required=True, help="blocks of the output")
    a = ap.parse_args()
    if os.path.abspath(a.src) == os.path.abspath(a.out):
        sys.exit("the output must not be the input")
    with open(a.src, "rb") as f:
        r = Reader(f)
        if r.read(4) != b"GGUF":
            sys.exit(f"{a.src} is not a GGUF file")
        version = r.unpack("I")
        if version != 3:
            sys.exit(f"GGUF version {version}: only version 3 is handled")
        n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
        kvs, arch, alignment, old_layers = [], None, 32, None
        for _ in range(n_kv):
            key = r.string().decode()
            t = r.unpack("I")
            raw = r.value_bytes(t)
            if key == "general.architecture":
                arch = raw[8:].decode()
            if key == "general.alignment":
                alignment = struct.unpack("<I", raw)[0]
            kvs.append([key, t, raw])
        for kv in kvs:
            if kv[0] == f"{arch}.block_count":
                old_layers = struct.unpack("<" + FIXED[kv[1]], kv[2])[0]
                kv[2] = struct.pack("<" + FIXED[kv[1]], a.layers)
        if old_layers is None:
            sys.exit(f"no {arch}.block_count in {a.src}")
        tensors = []  # (name, dims, type, offset in the data section, size)
        for _ in range(n_tensors):
            name = r.string().decode()
            nd = r.unpack("I")
            dims = [r.unpack("Q") for _ in range(nd)]
            tensors.append([name, dims, r.unpack("I"), r.unpack("Q")])
        pos = f.tell()
        data_start = (pos + alignment - 1) // alignment * alignment
        file_size = os.path.getsize(a.src)
        ends = sorted(t[3] for t in tensors) + [file_size - data_start]
        for t in tensors:  # a tensor's bytes run to the next tensor's offset (or the end)
            nxt = min(e for e in ends if e > t[3])
            t.append(nxt - t[3])
        blk = re.compile(r"^blk\.(\d+)\.(.*)$")
        shared = [t for t in tensors if not blk.match(t[0])]
        per_layer = {}
        for t in tensors:
            m = blk.match(t[0])
            if m:
                per_layer.setdefault(int(m.group(1)), []).append((m.group(2), t))
        if sorted(per_layer) != list(range(old_layers)):
            sys.exit(f"{a.src}: blocks {sorted(per_layer)} do not match block_count {old_layers}")
        out_tensors = [(t[0], t) for t in shared]
        for i in range(a.layers):
            out_tensors += [(f"blk.{i}.{rest}", t) for rest, t in per_layer[i % old_layers]]

        def aligned(n):
            return (n + alignment - 1) // alignment * alignment

        tmp = a.out + ".tmp"
        with open(tmp, "wb") as o:
            o.write(b"GGUF" + struct.pack("<IQQ", 3, len(out_tensors), len(kvs)))
            for key, t, raw in kvs:
                k = key.encode()
                o.write(struct.pack("<Q", len(k)) + k + struct.pack("<I", t) + raw)
            offset = 0
            for name, t in out_tensors:
                n = name.encode()
                o.write(struct.pack("<Q", len(n)) + n + struct.pack("<I", len(t[1])))
                o.write(b"".join(struct.pack("<Q", d) for d in t[1]))
                o.write(struct.pack("<IQ", t[2], offset))
                offset = aligned(offset + t[4])
            o.write(b"\0" * (aligned(o.tell()) - o.tell()))
            total, done = sum(t[4] for _, t in out_tensors), 0
            for i, (name, t) in enumerate(out_tensors):
                f.seek(data_start + t[3])
                left = t[4]
                while left > 0:
                    chunk = f.read(min(left, 64 << 20))
                    o.write(chunk)
                    left -= len(chunk)
                done += t[4]
                if i + 1 < len(out_tensors):
                    o.write(b"\0" * (aligned(o.tell()) - o.tell()))
                if done * 100 // total != (done - t[4]) * 100 // total or done == total:
                    print(f"\r{done / 1e9:6.2f} / {total / 1e9:.2f} GB", end="", file=sys.stderr)
            print(file=sys.stderr)
        os.replace(tmp, a.out)
    print(f"{a.out}: {a.layers} blocks from {old_layers} ({os.path.getsize(a.out) / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
