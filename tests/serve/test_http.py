#!/usr/bin/env python3
"""`moe serve` driven over HTTP on 127.0.0.1, as clients would: OpenAI's completions API
(plain and streamed), its answers checked against `moe generate` on the same checkpoint; the
routing extension and /v1/routing (a text's routing, the same as a completion's for its
prompt); /v1/models with its `moe` extension, /health, /metrics and the page at /; and bad input: malformed JSON, wrong types,
unknown fields, contexts overrun, a missing API key, 200 concurrent connections, clients that
stall or vanish. Each bad request must get OpenAI's error shape with the right status, and the
server must keep serving with bounded memory.

    tests/serve/test_http.py --moe build/release/moe --work /tmp/serve_test
"""
import argparse
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

KEY = "test-key"
# A chat template for the byte-level test model (its checkpoint has none).
CHAT_TEMPLATE = """{%- for m in messages %}
{%- if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' ~ m.role) }}{% endif %}
<{{ m.role }}>{{ m.content }}
{% endfor %}
{%- if add_generation_prompt %}<assistant>{% endif %}"""
FAILURES = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)


def request(port, method, path, body=None, key=KEY, raw=None, timeout=60):
    """Returns (status, headers, body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    c.request(method, path, body=data, headers=headers)
    r = c.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    c.close()
    return out


def is_error_shape(body, code=None):
    try:
        e = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    ok = isinstance(e.get("message"), str) and e["message"] and isinstance(e.get("type"), str)
    ok = ok and "code" in e
    return ok and (code is None or e["code"] == code)


def sse_events(body):
    """The data payloads of a server-sent event stream, in order."""
    out = []
    for block in body.decode("utf-8", "replace").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                out.append(line[len("data: "):])
    return out


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(text, name):
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    ckpt = os.path.join(args.work, "model")
    subprocess.run([args.moe, "train", "--preset", "tiny", "--steps", "40", "--batch", "8",
                    "--seq-len", "64", "--eval-every", "0", "--sample", "0", "--save-every", "0",
                    "--out", ckpt], check=True, capture_output=True)
    with open(os.path.join(ckpt, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    # A template using what the engine cannot render is refused at start-up, by name.
    bad = os.path.join(args.work, "bad_template")
    shutil.copytree(ckpt, bad)
    with open(os.path.join(bad, "chat_template.jinja"), "w") as f:
        f.write("{% include 'x.jinja' %}")
    r = subprocess.run([args.moe, "serve", "-m", bad, "--port", "0"], capture_output=True, text=True,
                       timeout=60)
    check(r.returncode != 0 and "'{% include %}' is not supported" in r.stderr,
          f"an unsupported chat template is refused at start-up ({r.stderr.strip()[-90:]})")
    ctx = 96
    # Under AddressSanitizer, freed memory waits in a quarantine (256 MB by default) before reuse:
    # a small one keeps the resident-memory check about the server, not the sanitizer.
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = ":".join(filter(None, [env.get("ASAN_OPTIONS", ""), "quarantine_size_mb=8"]))
    server = subprocess.Popen([args.moe, "serve", "-m", ckpt, "--port", "0", "--parallel", "3",
                               "--queue", "4", "--ctx", str(ctx), "--api-key", KEY,
                               "--threads", "1"],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        check(m is not None, f"server announces its address: {line.strip()}")
        if not m:
            return 1
        port = int(m.group(1))
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        run_checks(args, ckpt, port, server.pid, ctx)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            FAILURES.append("server did not stop on SIGTERM")
    check(server.returncode == 0, f"server exits cleanly on SIGTERM (status {server.returncode})")
    slow = subprocess.Popen([args.moe, "serve", "-m", ckpt, "--port", "0", "--parallel", "1",
                             "--ctx", str(ctx), "--api-key", KEY, "--threads", "1",
                             "--step-delay-ms", "50"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        m = re.search(r"http://127\.0\.0\.1:(\d+)", slow.stderr.readline())
        check(m is not None, "a server with --step-delay-ms starts")
        if m:
            threading.Thread(target=lambda: [None for _ in slow.stderr], daemon=True).start()
            check_vanishing_client(int(m.group(1)))
    finally:
        slow.terminate()
        slow.wait(timeout=20)
    print(f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


def check_vanishing_client(port):
    """A client that vanishes mid-stream frees its slot at once: its request is cancelled, not
    run to its end (this server pauses 50 ms before each step, so that the 80 tokens would take
    4 s: the test does not race the engine's speed)."""
    cancelled0 = metric(request(port, "GET", "/metrics")[2].decode(), "moe_requests_cancelled_total")
    sock = socket.create_connection(("127.0.0.1", port))
    req = json.dumps({"prompt": "The ", "max_tokens": 80, "stream": True, "seed": 1})
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(req)}\r\n\r\n{req}")
                 .encode())
    sock.recv(100)
    sock.close()
    freed = False
    for _ in range(40):
        m = request(port, "GET", "/metrics")[2].decode()
        if metric(m, "moe_requests_active") == 0 and \
                metric(m, "moe_requests_cancelled_total") == cancelled0 + 1:
            freed = True
            break
        time.sleep(0.05)
    check(freed, "a vanished client's request is cancelled and its slot free within 2 s")


def run_checks(args, ckpt, port, pid, ctx):
    # Health, models, the API key.
    s, _, b = request(port, "GET", "/health", key=None)
    check(s == 200 and json.loads(b)["status"] == "ok", "GET /health without a key: 200")
    s, _, b = request(port, "GET", "/v1/models", key=None)
    check(s == 401 and is_error_shape(b, "invalid_api_key"), "no API key: 401, error shape")
    s, _, b = request(port, "GET", "/v1/models", key="wrong")
    check(s == 401 and is_error_shape(b), "wrong API key: 401")
    s, _, b = request(port, "GET", "/v1/models")
    models = json.loads(b)
    check(s == 200 and models["object"] == "list" and models["data"][0]["id"] == "model",
          "GET /v1/models lists the model")
    check(models["data"][0].get("moe") == {"layers": 2, "experts": 4, "top_k": 2, "context": ctx,
                                           "chat_template": True},
          f"GET /v1/models: the moe extension ({models['data'][0].get('moe')})")
    s, h, b = request(port, "GET", "/", key=None)
    check(s == 200 and h.get("Content-Type") == "text/html; charset=utf-8" and
          b.startswith(b"<!doctype html>") and b"/v1/routing" in b,
          "GET / without a key: the routing page, as UTF-8 HTML")

    # A greedy completion equals `moe generate`'s text.
    prompt = "The "
    gen = subprocess.run([args.moe, "generate", "-m", ckpt, "-p", prompt, "-n", "24", "--temp",
                          "0"], check=True, capture_output=True).stdout
    want = gen[len(prompt):].rstrip(b"\n").decode("utf-8", "replace")
    s, h, b = request(port, "POST", "/v1/completions",
                      {"model": "model", "prompt": prompt, "max_tokens": 24, "temperature": 0})
    r = json.loads(b)
    text = r["choices"][0]["text"]
    check(s == 200 and r["object"] == "text_completion", "POST /v1/completions: 200")
    check(text == want, f"greedy text equals moe generate's ({text!r})")
    check(r["choices"][0]["finish_reason"] == "length", "finish_reason length")
    u = r["usage"]
    check(u["prompt_tokens"] == len(prompt.encode()) + 1 and u["completion_tokens"] == 24 and
          u["total_tokens"] == u["prompt_tokens"] + 24, f"usage counts {u}")

    # Streamed: the same text in chunks, usage, then [DONE].
    s, h, b = request(port, "POST", "/v1/completions",
                      {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    ev = sse_events(b)
    check(s == 200 and h.get("Content-Type", "").startswith("text/event-stream"),
          "stream: text/event-stream")
    check(ev and ev[-1] == "[DONE]", "stream ends with data: [DONE]")
    chunks = [json.loads(e) for e in ev[:-1]]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    check(streamed == want, "streamed text equals the plain answer")
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    check(finals[-1] == "length" and all(f is None for f in finals[:-1]),
          "finish_reason on the last chunk only")
    check("usage" in chunks[-1] and chunks[-1]["usage"]["completion_tokens"] == 24,
          "include_usage: a last chunk with the usage")

    # Chat: the template's text as the prompt, no BOS added (the template writes what it wants).
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = "<system>Be brief.\n<user>Hi\n<assistant>"
    s, _, b = request(port, "POST", "/v1/chat/completions",
                      {"messages": msgs, "max_tokens": 12, "temperature": 0})
    r = json.loads(b)
    s2, _, b2 = request(port, "POST", "/v1/completions",
                        {"prompt": list(rendered.encode()), "max_tokens": 12, "temperature": 0})
    check(s == 200 and r["object"] == "chat.completion" and
          r["choices"][0]["message"]["role"] == "assistant", "POST /v1/chat/completions: 200")
    check(r["choices"][0]["message"]["content"] == json.loads(b2)["choices"][0]["text"],
          "chat answer equals the completion of the rendered template")
    check(r["usage"]["prompt_tokens"] == len(rendered.encode()), "chat usage counts the template's tokens")
    s, h, b = request(port, "POST", "/v1/chat/completions",
                      {"messages": msgs, "max_tokens": 12, "temperature": 0, "stream": True})
    ev = sse_events(b)
    chunks = [json.loads(e) for e in ev[:-1]]
    check(ev[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks) and
          chunks[0]["choices"][0]["delta"].get("role") == "assistant" and
          "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) ==
          r["choices"][0]["message"]["content"] and chunks[-1]["choices"][0]["finish_reason"] == "length",
          "streamed chat: role first, the same content, finish_reason last")
    parts = [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    s, _, b = request(port, "POST", "/v1/chat/completions", {"messages": parts, "max_tokens": 2})
    check(s == 200, "chat content as text parts")
    for what, body, code in [
            ("a message without a role", {"messages": [{"content": "x"}]}, "invalid_type"),
            ("content of the wrong type", {"messages": [{"role": "user", "content": 3}]}, "invalid_type"),
            ("no messages", {"max_tokens": 3}, "missing_field"),
            ("an image part", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
             "unsupported_value"),
            ("tool_choice required", {"messages": msgs, "tool_choice": "required"}, "unsupported_value"),
            ("a role the template refuses", {"messages": [{"role": "robot", "content": "x"}]},
             "chat_template_error"),
            ("a prompt field in chat", {"messages": msgs, "prompt": "x"}, "unknown_field")]:
        s, _, b = request(port, "POST", "/v1/chat/completions", body)
        check(s == 400 and is_error_shape(b, code), f"chat, {what}: 400, error shape")

    # A stop string ends the text before it.
    if len(want) > 6:
        stop = want[3:5]
        s, _, b = request(port, "POST", "/v1/completions",
                          {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop]})
        r = json.loads(b)
        check(r["choices"][0]["text"] == want[:want.find(stop)] and
              r["choices"][0]["finish_reason"] == "stop", f"stop {stop!r} cuts the text")

    # Seeded sampling: the same seed, the same text, alone or among other requests.
    body = {"prompt": "Der ", "max_tokens": 20, "temperature": 1.0, "top_p": 0.95, "seed": 7}
    alone = json.loads(request(port, "POST", "/v1/completions", body)[2])["choices"][0]["text"]
    results = [None] * 5

    def worker(i):
        b2 = dict(body) if i == 2 else {"prompt": f"{i} ", "max_tokens": 16 + i, "seed": i}
        results[i] = json.loads(request(port, "POST", "/v1/completions", b2)[2])
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    check(results[2]["choices"][0]["text"] == alone, "a seeded request gets the same text in a batch")

    # The routing extension: every position's experts, layer by layer.
    s, _, b = request(port, "POST", "/v1/completions",
                      {"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True,
                       "routing": True})
    chunks = [json.loads(e) for e in sse_events(b)[:-1]]
    routed = [c["routing"] for c in chunks if "routing" in c]
    n_prompt = len(prompt.encode()) + 1
    positions = sum(len(x["experts"]) for x in routed)
    check(routed and routed[0]["from"] == 0 and len(routed[0]["experts"]) == n_prompt,
          "routing: the prompt's positions first")
    check(positions == n_prompt + 5 and all(
        x["from"] == n_prompt + i for i, x in enumerate(routed[1:])), "routing: one position per token")
    first = routed[0]["experts"][0]
    check(len(first) == 2 and all(len(l) == 2 for l in first), "routing: 2 layers, top-2 each")
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    check(routed[0]["tokens"] == ["<bos>"] + list(prompt) and
          "".join(t for x in routed[1:] for t in x["tokens"]) == streamed[:5],
          f"routing: the text of each position ({[x['tokens'] for x in routed]})")

    # /v1/routing: a text's prompt pass alone, the same routing a completion reports for it.
    s, _, b = request(port, "POST", "/v1/routing", {"text": prompt, "model": "model"})
    r = json.loads(b)
    check(s == 200 and r["object"] == "routing" and r["tokens"] == routed[0]["tokens"] and
          r["usage"] == {"prompt_tokens": n_prompt}, "POST /v1/routing: the tokens of the text")
    check(r["routing"] == {"from": 0, "experts": routed[0]["experts"], "weights": routed[0]["weights"]},
          "/v1/routing: the experts and weights a completion reports for its prompt")
    s, _, b = request(port, "POST", "/v1/completions",
                      {"prompt": prompt, "max_tokens": 3, "temperature": 0, "routing": True})
    plain = json.loads(b)["routing"]
    check(plain[0]["tokens"] == r["tokens"] and plain[0]["experts"] == r["routing"]["experts"] and
          [x["from"] for x in plain] == [0, n_prompt, n_prompt + 1],
          "a plain completion's routing: the same, and one position per later token")
    s, _, b = request(port, "POST", "/v1/routing", {"text": "y" * (ctx - 1)})
    check(s == 200 and len(json.loads(b)["routing"]["experts"]) == ctx,
          "/v1/routing: a text that fills the context")
    long_text = "The routing of a longer text, to check it against the prompt of a completion."
    s, _, b = request(port, "POST", "/v1/routing", {"text": long_text})
    s2, _, b2 = request(port, "POST", "/v1/completions",
                        {"prompt": long_text, "max_tokens": 1, "routing": True})
    check(s == 200 and s2 == 200 and
          json.loads(b)["routing"]["experts"] == json.loads(b2)["routing"][0]["experts"],
          "/v1/routing of a longer text: the completion's routing of its prompt")
    for what, body, raw, status, code in [
            ("malformed JSON", None, b'{"text": ', 400, "invalid_json"),
            ("no text", {"model": "model"}, None, 400, "missing_field"),
            ("text of the wrong type", {"text": ["a"]}, None, 400, "invalid_type"),
            ("empty text", {"text": ""}, None, 400, "invalid_value"),
            ("model of the wrong type", {"text": "a", "model": 3}, None, 400, "invalid_type"),
            ("an unknown field", {"text": "a", "max_tokens": 3}, None, 400, "unknown_field"),
            ("a text beyond the context", {"text": "y" * ctx}, None, 400, "context_length_exceeded")]:
        s, _, b = request(port, "POST", "/v1/routing", body, raw=raw)
        check(s == status and is_error_shape(b, code), f"/v1/routing, {what}: {status}, error shape")
    s, _, b = request(port, "POST", "/v1/routing", {"text": "a"}, key=None)
    check(s == 401 and is_error_shape(b, "invalid_api_key"), "/v1/routing without the API key: 401")

    # Bad requests: OpenAI's error shape and the right status.
    bad = [
        ("malformed JSON", None, b'{"prompt": "x", ', 400, "invalid_json"),
        ("not an object", None, b'[1, 2]', 400, "invalid_json"),
        ("wrong type", {"prompt": "x", "max_tokens": "ten"}, None, 400, "invalid_type"),
        ("wrong type (stream)", {"prompt": "x", "stream": "yes"}, None, 400, "invalid_type"),
        ("unknown field", {"prompt": "x", "foo": 1}, None, 400, "unknown_field"),
        ("no prompt", {"max_tokens": 3}, None, 400, "missing_field"),
        ("n = 2", {"prompt": "x", "n": 2}, None, 400, None),
        ("temperature -1", {"prompt": "x", "temperature": -1}, None, 400, "invalid_value"),
        ("token id out of range", {"prompt": [1, 99999]}, None, 400, "invalid_value"),
        ("max_tokens past the context", {"prompt": "x", "max_tokens": ctx}, None, 400,
         "context_length_exceeded"),
        ("prompt longer than the context", {"prompt": "y" * (ctx + 10)}, None, 400,
         "context_length_exceeded"),
        ("logprobs", {"prompt": "x", "logprobs": 3}, None, 400, "unsupported_value"),
    ]
    for what, body, raw, status, code in bad:
        s, _, b = request(port, "POST", "/v1/completions", body, raw=raw)
        check(s == status and is_error_shape(b, code), f"{what}: {status}, error shape")
    s, _, b = request(port, "GET", "/v1/nothing")
    check(s == 404 and is_error_shape(b), "unknown route: 404, error shape")
    s, _, b = request(port, "POST", "/v1/completions", raw=b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    check(s == 413 and is_error_shape(b), "a 2 MB body: 413, error shape")

    # A client that stalls mid-request does not hold up the others.
    stall = socket.create_connection(("127.0.0.1", port))
    stall.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    t0 = time.time()
    s, _, _ = request(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 4})
    check(s == 200 and time.time() - t0 < 10, "a stalled client does not hold up the others")

    # 200 concurrent connections: each is served or told 503 with Retry-After; memory stays
    # bounded and the server keeps serving.
    rss0 = rss_kb(pid)
    outcomes = []
    lock = threading.Lock()

    def client(i):
        try:
            s, h, b = request(port, "POST", "/v1/completions",
                              {"prompt": "Il ", "max_tokens": 8, "seed": i, "stream": i % 2 == 0},
                              timeout=120)
            ok = (s == 200 and (b.endswith(b"data: [DONE]\n\n") or b"choices" in b)) or \
                 (s == 503 and "Retry-After" in h and is_error_shape(b, "overloaded"))
            with lock:
                outcomes.append((s, ok))
        except Exception as e:  # noqa: BLE001
            with lock:
                outcomes.append((str(e), False))
    ts = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    served = sum(1 for s, _ in outcomes if s == 200)
    busy = sum(1 for s, _ in outcomes if s == 503)
    check(len(outcomes) == 200 and all(ok for _, ok in outcomes),
          f"200 concurrent connections: {served} served, {busy} told 503 (bad: "
          f"{[s for s, ok in outcomes if not ok][:5]})")
    stall.close()
    rss1 = rss_kb(pid)
    check(rss1 - rss0 < 64 * 1024, f"resident memory {rss0 // 1024} -> {rss1 // 1024} MB")
    s, _, b = request(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 4})
    check(s == 200, "still serving afterwards")

    # Metrics: Prometheus text with the counters and each expert's tokens.
    s, h, b = request(port, "GET", "/metrics")
    m = b.decode()
    check(s == 200 and metric(m, "moe_requests_total") >= 10, "metrics: requests counted")
    check(metric(m, "moe_requests_rejected_total") == busy, "metrics: the 503s counted")
    check(metric(m, "moe_generated_tokens_total") > 100 and
          metric(m, "moe_queue_length") is not None and
          metric(m, "moe_tokens_per_second") is not None, "metrics: tokens, queue, tokens/s")
    check(re.search(r'^moe_expert_tokens_total\{layer="1",expert="3"\} \d+$', m, re.M) is not None,
          "metrics: tokens per expert of each MoE layer")


if __name__ == "__main__":
    sys.exit(main())
