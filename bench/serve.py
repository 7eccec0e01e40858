#!/usr/bin/env python3
"""`moe serve` under load: N concurrent clients on 127.0.0.1, each streaming completions one
after another, for N = 1, 2, 4, 8 (and more with --clients). Reports the aggregate tokens/s,
the time to first token (p50, p99) and the ratio to one client, and writes a table and a plot
to docs/results/serve.md.

    bench/serve.py [--moe build/release/moe] [--model out/train/latest] [--clients 1,2,4,8]
                   [--requests 6] [--max-tokens 128]

Without --model it trains the `small` preset for --train-steps steps first (out/serve_model).
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = ["The ", "Der ", "Il ", "Un homme ", "Q: ", "A ", "Le ", "Die "]


def stream_one(port, prompt, max_tokens, seed):
    """One streamed completion: (time to first token, tokens, seconds)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                       "seed": seed, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.status
    ttft, tokens, buf = None, 0, b""
    while True:
        chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: "):
                continue
            data = event[6:]
            if data == b"[DONE]":
                continue
            j = json.loads(data)
            if j.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if "usage" in j:
                tokens = j["usage"]["completion_tokens"]
    c.close()
    return ttft, tokens, time.perf_counter() - t0


def load(port, clients, requests, max_tokens):
    results, lock = [], threading.Lock()

    def client(i):
        for r in range(requests):
            out = stream_one(port, PROMPTS[(i + r) % len(PROMPTS)], max_tokens, 1000 * i + r)
            with lock:
                results.append(out)
    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    p = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_ms": 1e3 * statistics.median(ttfts),
            "ttft_p99_ms": 1e3 * p(0.99)}


def svg(rows, path):
    w, h, pad = 560, 360, 60
    xs = [r["clients"] for r in rows]
    ys = [r["tokens_per_s"] for r in rows]
    x_max, y_max = max(xs), max(ys) * 1.1
    sx = lambda x: pad + (w - 2 * pad) * x / x_max
    sy = lambda y: h - pad - (h - 2 * pad) * y / y_max
    pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
    ideal = " ".join(f"{sx(x):.1f},{sy(min(y_max, ys[0] * x)):.1f}" for x in xs)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' "
           "font-family='sans-serif' font-size='12'>",
           "<rect width='100%' height='100%' fill='white'/>",
           f"<text x='{pad}' y='25' font-size='14'>Aggregate tokens/s by concurrent clients</text>",
           f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='black'/>",
           f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='black'/>",
           f"<polyline points='{ideal}' fill='none' stroke='#bbbbbb' stroke-dasharray='4'/>",
           f"<polyline points='{pts}' fill='none' stroke='#1f77b4' stroke-width='2'/>"]
    for x, y in zip(xs, ys):
        out.append(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='#1f77b4'/>")
        out.append(f"<text x='{sx(x):.1f}' y='{h - pad + 16}' text-anchor='middle'>{x}</text>")
        out.append(f"<text x='{sx(x) + 5:.1f}' y='{sy(y) - 6:.1f}'>{y:.0f}</text>")
    out.append(f"<text x='{w - pad}' y='{h - 15}' text-anchor='end'>clients (dashed: one "
               "client's rate times N)</text>")
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def engine_rows(args, model, batch):
    """moe bench decode --batch for the served model on one thread and on every core, and for a
    dense model of the same active parameters (the `small-dense` preset, two training steps: its
    speed does not depend on its weights) on one thread."""
    dense = "out/serve_dense_model"
    if not os.path.exists(os.path.join(dense, "latest")):
        subprocess.run([args.moe, "train", "--preset", "small-dense", "--steps", "2", "--sample",
                        "0", "--eval-every", "0", "--out", dense], check=True,
                       capture_output=True)
    out = []
    for name, m, threads in ((f"`{model}`", model, 1), (f"`{model}`", model, 0),
                             ("dense, same active parameters", dense, 1)):
        r = subprocess.run([args.moe, "bench", "decode", "-m", m, "-n", str(args.max_tokens),
                            "--batch", str(batch), "-t", str(threads), "--json"],
                           capture_output=True, text=True, check=True)
        j = json.loads(r.stdout.strip().splitlines()[-1])
        j["experts"] = experts_of(m)
        out.append((name, j))
        print(json.dumps(j), flush=True)
    return out


def experts_of(model):
    """Routed experts per MoE layer of a checkpoint of this engine (0 for a dense one)."""
    d = model
    latest = os.path.join(model, "latest")
    if os.path.exists(latest):
        d = os.path.join(model, open(latest).read().strip())
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    own = cfg["moe_cpp"]
    return own["moe"]["n_experts"] if own.get("moe_every", 1) > 0 else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", default="build/release/moe")
    ap.add_argument("--model", default="")
    ap.add_argument("--train-steps", type=int, default=1800)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=6, help="per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--results", default="docs/results")
    args = ap.parse_args()
    model = args.model
    if not model:
        model = "out/serve_model"
        if not os.path.exists(os.path.join(model, "latest")):
            subprocess.run([args.moe, "train", "--steps", str(args.train_steps), "--sample", "0",
                            "--eval-every", "0", "--out", model], check=True)
    clients = [int(c) for c in args.clients.split(",")]
    server = subprocess.Popen([args.moe, "serve", "-m", model, "--port", "0", "--parallel",
                               str(max(clients)), "--queue", "64"],
                              stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        port = int(re.search(r":(\d+) \(", line).group(1))
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        stream_one(port, "warm ", 8, 0)
        rows = []
        for n in clients:
            rows.append(load(port, n, args.requests, args.max_tokens))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait()
    engine = engine_rows(args, model, max(clients))
    os.makedirs(args.results, exist_ok=True)
    svg(rows, os.path.join(args.results, "serve.svg"))
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                         capture_output=True, text=True).stdout.strip()
    path = os.path.join(args.results, "serve.md")
    with open(path, "w") as f:
        f.write(f"# `moe serve` under concurrent load (`bench/serve.py`)\n\n"
                f"Model `{model}`, `--parallel {max(clients)}`, on "
                f"{cpu} ({os.cpu_count()} cores); each client streams {args.requests} "
                f"completions of {args.max_tokens} tokens (temperature 0.8) one after another "
                f"over 127.0.0.1.\n\n"
                "| clients | requests | tokens | aggregate tokens/s | against one client | "
                "time to first token p50 | p99 |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['clients']} | {r['requests']} | {r['tokens']} | "
                    f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x "
                    f"| {r['ttft_p50_ms']:.1f} ms | {r['ttft_p99_ms']:.1f} ms |\n")
        f.write("\n![aggregate tokens/s](serve.svg)\n")
        b = max(clients)
        f.write(f"\n## The engine alone: {b} sequences a step against one\n\n"
                f"`moe bench decode -m MODEL -n {args.max_tokens} --batch {b}` (no HTTP, no "
                "clients): greedy decoding of one sequence, then of "
                f"{b} together, in one run. A step reads the fixed weights once, each routed "
                "expert that any of its tokens chose once, and every sequence's keys and values; "
                "were both read at the same speed, the batch could be at most "
                f"{b} x bytes(one) / bytes(batch) times faster (the bound).\n\n"
                "| model | threads | one sequence, tokens/s | batch, tokens/s | against one | "
                "experts read per MoE layer | MB a step reads (one / batch) | bound | "
                "of the bound |\n|---|---|---|---|---|---|---|---|---|\n")
        for name, j in engine:
            f.write(f"| {name} | {j['threads']} | {j['tokens_per_s']:.0f} | "
                    f"{j['batch_tokens_per_s']:.0f} | {j['batch_of_one']:.2f}x | "
                    f"{j['experts_per_layer_batch']:.2f} of {j.get('experts', 0)} | "
                    f"{j['step_mb_one']:.2f} / {j['step_mb_batch']:.2f} | "
                    f"{j['batch_of_one_bytes_bound']:.2f}x | "
                    f"{100 * j['batch_of_one'] / j['batch_of_one_bytes_bound']:.0f}% |\n")
    print(open(path).read())


if __name__ == "__main__":
    main()
