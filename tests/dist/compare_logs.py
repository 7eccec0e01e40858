#!/usr/bin/python3
"""Compares two `moe train --log` files step by step: the expert loads of every MoE layer must be
equal, the losses (training, auxiliary, validation) within relative 1e-6. Exit status 1 on a
difference. usage: compare_logs.py REFERENCE OTHER [FIRST_STEP]"""
import json
import sys

TOL = 1e-6


def read(path, first):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r["step"] >= first:
            out[(r["step"], "val_loss" in r)] = r
    return out


def main():
    ref_path, other_path = sys.argv[1], sys.argv[2]
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    ref, other = read(ref_path, first), read(other_path, first)
    if sorted(ref) != sorted(other):
        sys.exit(f"{other_path}: steps {sorted(other)} differ from {sorted(ref)}")
    worst = 0.0
    for key in sorted(ref):
        a, b = ref[key], other[key]
        for field in ("loss", "aux_loss", "val_loss"):
            if field in a:
                err = abs(a[field] - b[field]) / max(abs(a[field]), 1e-30)
                worst = max(worst, err)
                if err > TOL:
                    sys.exit(f"{other_path}: step {key[0]} {field} {b[field]} vs {a[field]}"
                             f" (relative {err:.2e} > {TOL})")
        if a.get("routed") != b.get("routed"):
            sys.exit(f"{other_path}: step {key[0]} routing {b.get('routed')} vs {a.get('routed')}")
    print(f"{other_path}: {len(ref)} records, same routing, worst relative loss difference"
          f" {worst:.1e}")


if __name__ == "__main__":
    main()
