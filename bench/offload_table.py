#!/usr/bin/python3
"""Expert offloading on a model whose experts do not fit the memory it may use: writes a random
model (`moe init`, by default 8 layers of 96 experts of width 1408 at d_model 512: 6.6 GB of
routed experts), generates with every expert in memory, then with the expert cache at several
sizes and with each eviction policy. It checks that every run generates the same tokens, and
writes tokens/s, hit rate, bytes read, stall time and peak resident memory to
docs/results/offload.md.

    /usr/bin/python3 bench/offload_table.py [--moe build/release/moe] [--work /tmp/moe_offload]
        [--cache-mb 512 1536 3072] [-n 64]
"""
import argparse
import json
import os
import re
import subprocess
import sys

CONFIG = {  # the model: a byte vocabulary, 8 layers, every one an MoE layer
    "vocab_size": 256, "d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 4,
    "d_ffn": 1408, "max_seq_len": 512, "rope_theta": 10000.0, "norm_eps": 1e-5,
    "tie_embeddings": False, "moe_every": 1, "first_dense": 0,
    "moe": {"d_model": 512, "d_ffn": 1408, "n_experts": 96, "top_k": 2, "act": "swiglu",
            "router": "topk"},
}


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return p.stdout, p.stderr


def drop_from_page_cache(path):
    """Asks the kernel to forget the file's cached pages, so that the next run reads the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def parse(stderr):
    out = {}
    m = re.search(r"(\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\)", stderr)
    out["tokens_per_s"] = float(m.group(3))
    m = re.search(r"(\d+) hits, (\d+) misses .*?(\d+) evictions; ([\d.]+) MB read, ([\d.]+) s stalled",
                  stderr)
    if m:
        out.update(hits=int(m.group(1)), misses=int(m.group(2)), evictions=int(m.group(3)),
                   read_mb=float(m.group(4)), stall_s=float(m.group(5)))
    m = re.search(r"prefetch: (\d+) experts read ahead, (\d+) of them used .*?; ([\d.]+) s of ([\d.]+) s"
                  r" of reading hidden", stderr)
    if m:
        out.update(prefetches=int(m.group(1)), prefetch_used=int(m.group(2)),
                   hidden_s=float(m.group(3)), load_s=float(m.group(4)))
    m = re.search(r"peak resident memory: ([\d.]+) MB", stderr)
    out["peak_mb"] = float(m.group(1)) if m else None
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if m:
        out["peak_mb"] = int(m.group(1)) / 1e3
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--moe", default=os.path.join(root, "build/release/moe"))
    p.add_argument("--work", default="/tmp/moe_offload")
    p.add_argument("--cache-mb", type=int, nargs="+", default=[512, 1536, 3072])
    p.add_argument("-n", type=int, default=64, help="tokens to generate")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(root, "docs/results/offload.md"))
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    model = os.path.join(a.work, "model")
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        cfg = os.path.join(a.work, "config.json")
        with open(cfg, "w") as f:
            json.dump(CONFIG, f)
        print("writing the model ...", file=sys.stderr)
        run([a.moe, "init", "--config", cfg, "--seed", "1", "--out", model, "-t", str(a.threads)])
    experts_gb = (CONFIG["n_layers"] * CONFIG["moe"]["n_experts"] * 3 * CONFIG["moe"]["d_ffn"] *
                  CONFIG["d_model"] * 4) / 1e9
    # Sampled (seeded) rather than greedy: a random model's greedy text repeats itself and keeps
    # to a few experts; sampled text visits many. The cache runs must draw the same tokens.
    gen = [a.moe, "generate", "-m", model, "--prompt-ids", "1,84,104,101,32,109,111,100,101,108",
           "-n", str(a.n), "--temp", "1", "--seed", "1", "--ids", "-t", str(a.threads)]
    print("every expert in memory ...", file=sys.stderr)
    # /usr/bin/time reports the peak resident memory of the run that loads every expert.
    ids, err = run(["/usr/bin/time", "-v"] + gen)
    rows = [("every expert in memory", "-", parse(err), True)]
    weights = os.path.join(model, "model.safetensors")
    for mb in a.cache_mb:
        for policy, ahead in (("lru", False), ("lfu", False), ("routing", False),
                              ("routing", True)):
            name = policy + (" + read-ahead" if ahead else "")
            print(f"cache {mb} MB, {name} ...", file=sys.stderr)
            drop_from_page_cache(weights)  # every run reads its experts from the disk
            got, err = run(gen + ["--expert-cache-mb", str(mb), "--cache-policy", policy] +
                           ([] if ahead else ["--no-prefetch"]))
            rows.append((f"{mb} MB cache", name, parse(err), got == ids))
    lines = [
        "# Expert offloading",
        "",
        f"Written by `bench/offload_table.py`: a random model of {experts_gb:.2f} GB of routed"
        f" experts ({CONFIG['n_layers']} layers of {CONFIG['moe']['n_experts']} experts of width"
        f" {CONFIG['moe']['d_ffn']} at d_model {CONFIG['d_model']}, top-{CONFIG['moe']['top_k']}),"
        f" {a.n} tokens sampled (temperature 1, seed 1) after a 10-token prompt, {a.threads} threads."
        " Before each cache run the checkpoint's pages are dropped from the operating system's"
        " page cache, so its experts come from the disk. Read-ahead guesses the next MoE layer's"
        " experts with that layer's router on the current hidden state and reads them on a second"
        " thread while the current layer computes.",
        "",
        "| experts | policy | same tokens | tokens/s | hits | misses | hit rate | read (MB) |"
        " stalled (s) | read ahead (used) | reading hidden | peak resident (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, policy, r, same in rows:
        n = r.get("hits", 0) + r.get("misses", 0)
        rate = f"{100 * r['hits'] / n:.1f}%" if n else "-"
        ahead = f"{r['prefetches']} ({r['prefetch_used']})" if "prefetches" in r else "-"
        hidden = (f"{r['hidden_s']:.2f} of {r['load_s']:.2f} s" if "hidden_s" in r else "-")
        lines.append(
            f"| {name} | {policy} | {'yes' if same else 'NO'} | {r['tokens_per_s']:.2f} |"
            f" {r.get('hits', '-')} | {r.get('misses', '-')} | {rate} | {r.get('read_mb', '-')} |"
            f" {r.get('stall_s', '-')} | {ahead} | {hidden} | {r['peak_mb']:.0f} |")
    lines.append("")
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    if not all(same for *_, same in rows):
        sys.exit("a cache run generated other tokens than the model with every expert in memory")


if __name__ == "__main__":
    main()
