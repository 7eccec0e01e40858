#!/usr/bin/env python3
"""`moe serve`'s routing page (GET /) in headless chromium, driven through chromedriver over the
W3C WebDriver protocol (plain JSON over HTTP, with urllib): the page loads with no console error
and no outside resource; a chat message streams its answer; the grid has a cell per MoE layer
and routed position, each coloured by the top-1 expert that the API reports for the same
request; the hover tip names the position, layer and experts; the load bars add up to
positions x top_k per layer; the "Routing of a text" tab draws /v1/routing's grid; a model
without a chat template falls back to /v1/completions and says so; a model of 48 MoE layers and
128 experts draws its grid. Saves screenshots in the work folder.

    tests/serve/test_page.py --moe build/release/moe --work /tmp/serve_page
"""
import argparse
import base64
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
import urllib.error
import urllib.request

CHAT_TEMPLATE = """{%- for m in messages %}<{{ m.role }}>{{ m.content }}
{% endfor %}{%- if add_generation_prompt %}<assistant>{% endif %}"""
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
FAILURES = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)
    return cond


def wait_for(fn, what, timeout=60):
    """fn()'s first truthy value, polled until the deadline; raises naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.status, r.read()
    c.close()
    return out


class WebDriver:
    """The few W3C WebDriver commands the test needs, as JSON over HTTP to chromedriver."""

    def __init__(self, url, profile):
        self.url = url
        caps = {"browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": shutil.which("chromium") or "/usr/bin/chromium",
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1200,760",
                             "--force-device-scale-factor=1", "--no-first-run",
                             "--disable-extensions", "--disable-background-networking",
                             "--user-data-dir=" + profile]},
                "goog:loggingPrefs": {"browser": "ALL"}}
        self.session = self.call("POST", "/session",
                                 {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def call(self, method, path, body=None):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.read()[:600]!r}") from None

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def get(self, url):
        self.s("POST", "/url", {"url": url})

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css):
        return self.s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css):
        self.s("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css, text, clear=True):
        el = self.find(css)
        if clear:
            self.s("POST", f"/element/{el}/clear", {})
        self.s("POST", f"/element/{el}/value", {"text": text})

    def hover(self, element):
        self.s("POST", "/actions", {"actions": [{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [{"type": "pointerMove", "duration": 0, "x": 0, "y": 0,
                         "origin": {ELEMENT: element}}]}]})

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.s("GET", "/screenshot")))

    def console_errors(self):
        """The browser log's SEVERE entries since the last call (chromedriver's log command)."""
        return [e["message"] for e in self.s("POST", "/se/log", {"type": "browser"})
                if e["level"] == "SEVERE"]

    def quit(self):
        self.s("DELETE", "")


class Server:
    """`moe serve` on a free port, its stderr drained in the background."""

    def __init__(self, moe, ckpt, ctx):
        self.proc = subprocess.Popen([moe, "serve", "-m", ckpt, "--port", "0", "--ctx", str(ctx),
                                      "--parallel", "2", "--threads", "1"],
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"moe serve did not start: {line!r}")
        self.port = int(m.group(1))
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.proc.returncode


def positions(routing_list):
    """The routing objects of an answer joined: (tokens, experts[pos][layer][k])."""
    tokens, experts = [], []
    for r in sorted(routing_list, key=lambda r: r["from"]):
        assert r["from"] == len(experts), "routing positions are contiguous"
        tokens += r.get("tokens", [""] * len(r["experts"]))
        experts += r["experts"]
    return tokens, experts


def route_text(wd, port, text):
    """Routes a text in the page's text tab, waits for its grid, and returns the API's answer
    for the same text (POST /v1/routing)."""
    wd.type("#text-input", text)
    wd.click("#route")
    wait_for(lambda: wd.js("return document.getElementById('text-status').textContent"
                           ".includes('positions routed');"), "the text's routing is drawn")
    return json.loads(api(port, "POST", "/v1/routing", {"text": text})[1])


def check_view(wd, view, experts, palette, top_k, what):
    """The grid and load bars of #view against the API's experts[pos][layer][k]."""
    P, L = len(experts), len(experts[0])
    cells = wd.js("""return Array.from(document.querySelectorAll(arguments[0] + ' rect.cell'),
                     c => [+c.dataset.pos, +c.dataset.layer, c.getAttribute('fill')]);""", view)
    check(len(cells) == P * L, f"{what}: {len(cells)} cells = {L} layers x {P} positions")
    wrong = [(p, l, fill) for p, l, fill in cells if fill != palette[experts[p][l][0]]]
    check(not wrong and {(p, l) for p, l, _ in cells} == {(p, l) for p in range(P) for l in range(L)},
          f"{what}: each cell has its top-1 expert's colour (wrong: {wrong[:3]})")
    labels = wd.js("return document.querySelectorAll(arguments[0] + ' text.tok').length;", view)
    check(labels == P, f"{what}: a token text under each of the {P} columns")
    bars = wd.js("""const out = {};
                    for (const b of document.querySelectorAll(arguments[0] + ' rect.bar'))
                      (out[b.dataset.layer] ??= []).push(+b.dataset.count);
                    return out;""", view)
    want = [[sum(e in experts[p][l] for p in range(P)) for e in range(len(palette))]
            for l in range(L)]
    check(len(bars) == L and all(sum(bars[str(l)]) == P * top_k for l in range(L)),
          f"{what}: each layer's load bars sum to {P} positions x top-{top_k}")
    check(all(bars[str(l)] == want[l] for l in range(L)),
          f"{what}: each bar counts its expert's token-slots")


def check_tip(wd, view, tokens, experts, pos, layer, what):
    cell = wd.js("""const c = document.querySelector(
                      `${arguments[0]} rect.cell[data-pos="${arguments[1]}"][data-layer="${arguments[2]}"]`);
                    c.scrollIntoView({block: 'center', inline: 'center'});
                    return c;""", view, pos, layer)
    wd.hover(cell[ELEMENT])
    tip = wait_for(lambda: wd.js("const t = document.getElementById('tip');"
                                 "return t.hidden ? '' : t.textContent;"), f"{what}: the tip shows")
    lines = tip.split("\n")
    check(f"position {pos} \u00b7 layer {layer}" in lines[0] and json.dumps(tokens[pos]) in lines[0],
          f"{what}: the tip names the token, position and layer ({lines[0]!r})")
    named = [int(m.group(1)) for m in (re.match(r"expert (\d+)\s+[0-9.]+$", x) for x in lines[1:]) if m]
    check(named == experts[pos][layer],
          f"{what}: the tip names the experts, top-1 first ({named} vs {experts[pos][layer]})")


def wait_loaded(wd, port):
    wd.get(f"http://127.0.0.1:{port}/")
    return wait_for(lambda: wd.js("return document.getElementById('send').disabled ? '' : "
                                  "document.getElementById('info').textContent;"), "the page loads")


def chat(wd, text, max_tokens, what):
    """Sends a message from the page at temperature 0; returns (answer, DOM updates seen)."""
    wd.type("#max-tokens", str(max_tokens))
    wd.type("#temperature", "0")
    wd.js("""window.updates = 0;
             new MutationObserver(() => ++window.updates).observe(
               document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
    wd.type("#chat-input", text)
    wd.click("#send")
    status = wait_for(lambda: wd.js("const s = document.getElementById('chat-status').textContent;"
                                    "return /^(finished|error)/.test(s) ? s : '';"),
                      "the answer finishes", timeout=120)
    check(status.startswith("finished"), f"{what}: the answer finishes ({status!r})")
    return wd.js("const m = document.querySelectorAll('.msg.assistant');"
                 "return m[m.length - 1].textContent;"), wd.js("return window.updates;")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=40,
                    help="training steps of the test model (docs/serve_page.png: 400)")
    ap.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    plain = os.path.join(args.work, "plain")  # the byte-level model: no chat template
    subprocess.run([args.moe, "train", "--preset", "tiny", "--steps", str(args.steps), "--batch", "8",
                    "--seq-len", "64", "--eval-every", "0", "--sample", "0", "--save-every", "0",
                    "--out", plain], check=True, capture_output=True)
    ckpt = os.path.join(args.work, "chat")
    shutil.copytree(plain, ckpt)
    with open(os.path.join(ckpt, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    # A wide and deep model, untrained: 48 MoE layers of 128 experts.
    big = os.path.join(args.work, "big")
    subprocess.run([args.moe, "init", "--preset", "tiny", "--experts", "128", "--top-k", "8",
                    "--expert-ffn", "8", "--out", big], check=True, capture_output=True)
    with open(os.path.join(big, "config.json")) as f:
        big_config = json.load(f)["moe_cpp"]  # the engine's own config, which --config reads
    big_config["n_layers"] = 48
    with open(os.path.join(args.work, "big.json"), "w") as f:
        json.dump(big_config, f)
    shutil.rmtree(big)
    subprocess.run([args.moe, "init", "--config", os.path.join(args.work, "big.json"), "--out", big],
                   check=True, capture_output=True)

    driver = subprocess.Popen([args.chromedriver, f"--port={free_port()}"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    servers = []
    try:
        line = driver.stdout.readline()
        while "started successfully" not in line and "on port" not in line:
            if not line:
                raise RuntimeError("chromedriver did not start")
            line = driver.stdout.readline()
        url = "http://127.0.0.1:" + re.search(r"port (\d+)", line).group(1)
        threading.Thread(target=lambda: [None for _ in driver.stdout], daemon=True).start()

        def ready():
            try:
                with urllib.request.urlopen(url + "/status", timeout=5) as r:
                    return json.loads(r.read())["value"]["ready"]
            except OSError:  # not listening yet
                return False
        wait_for(ready, "chromedriver is ready", timeout=30)
        wd = WebDriver(url, os.path.join(args.work, "chromium-profile"))
        try:
            for ckpt_dir, name in [(ckpt, "chat"), (plain, "no template"), (big, "48 x 128")]:
                server = Server(args.moe, ckpt_dir, 256)
                servers.append(server)
                if name == "chat":
                    check_chat_model(wd, server.port, args.work)
                elif name == "no template":
                    check_plain_model(wd, server.port)
                else:
                    check_big_model(wd, server.port, args.work)
                check(server.stop() == 0, f"{name}: the server exits cleanly")
        finally:
            wd.quit()
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.stop()
        driver.terminate()
        driver.wait(timeout=20)
    print(f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


def page_checks(wd, port):
    """The page's source and what it loaded: nothing from outside; its model and palette."""
    s, body = api(port, "GET", "/")
    html = body.decode()
    outside = re.findall(r"""(?:src|href)\s*=\s*["']?(?!data:|#)[^"'\s>]+|url\(\s*["']?(?!data:)""", html)
    check(s == 200 and html.startswith("<!doctype html>") and not outside,
          f"GET /: the page, with no outside resource ({outside[:3]})")
    loaded = wd.js("return performance.getEntriesByType('resource').map(e => e.name);")
    check(all(u.startswith(f"http://127.0.0.1:{port}/") for u in loaded),
          f"the page fetched only from its server ({loaded})")
    model = json.loads(api(port, "GET", "/v1/models")[1])["data"][0]["moe"]
    palette = wd.js("return Array.from({length: arguments[0]}, (_, e) => expertColour(e));",
                    model["experts"])
    check(len(set(palette)) == model["experts"] and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in palette),
          f"a distinct colour for each of the {model['experts']} experts")
    return model, palette


def check_chat_model(wd, port, work):
    info = wait_loaded(wd, port)
    check("2 MoE layers" in info and "4 experts, top-2" in info, f"chat: the page names the model ({info!r})")
    check(wd.js("return document.getElementById('no-template').hidden;"),
          "chat: no fallback notice for a model with a chat template")
    model, palette = page_checks(wd, port)
    check(wd.console_errors() == [], "the page loads with no console error")

    answer, updates = chat(wd, "Hello there", 24, "chat")
    s, body = api(port, "POST", "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 24,
                   "temperature": 0, "routing": True})
    want = json.loads(body)
    check(s == 200 and answer == want["choices"][0]["message"]["content"],
          f"chat: the page's answer is the API's ({answer!r})")
    check(updates >= 2, f"chat: the answer streams in ({updates} updates)")
    tokens, experts = positions(want["routing"])
    check_view(wd, "#chat-view", experts, palette, model["top_k"], "chat")
    check_tip(wd, "#chat-view", tokens, experts, len(experts) - 2, 1, "chat")
    check(wd.console_errors() == [], "chat: no console error")
    wd.screenshot(os.path.join(work, "serve_page_chat.png"))

    # A second turn sends the conversation: the page's answer is the API's for the three turns.
    answer2, _ = chat(wd, "And then?", 8, "second turn")
    s, body = api(port, "POST", "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "Hello there"},
                                {"role": "assistant", "content": answer},
                                {"role": "user", "content": "And then?"}],
                   "max_tokens": 8, "temperature": 0, "routing": True})
    want = json.loads(body)
    check(answer2 == want["choices"][0]["message"]["content"],
          "chat: a second turn sends the whole conversation")
    check_view(wd, "#chat-view", positions(want["routing"])[1], palette, model["top_k"], "second turn")

    # The routing of a text, in its tab.
    wd.click('nav button[data-tab="text"]')
    check(wd.js("return !document.getElementById('tab-text').hidden && "
                "document.getElementById('tab-chat').hidden;"), "text: the tab shows")
    text = "Routing, token by token."
    r = route_text(wd, port, text)
    check_view(wd, "#text-view", r["routing"]["experts"], palette, model["top_k"], "text")
    check_tip(wd, "#text-view", r["tokens"], r["routing"]["experts"], 5, 0, "text")
    wd.screenshot(os.path.join(work, "serve_page_text.png"))
    check(wd.console_errors() == [], "text: no console error")

    # Errors reach the page's status line (the 400 itself is logged by the browser: only
    # script errors count then).
    wd.type("#text-input", "y" * 300)
    wd.click("#route")
    status = wait_for(lambda: wd.js("const s = document.getElementById('text-status');"
                                    "return s.classList.contains('error') ? s.textContent : '';"),
                      "an error is shown")
    check("context" in status, f"text: a text beyond the context shows the server's error ({status!r})")
    errors = [e for e in wd.console_errors() if "status of 400" not in e]
    check(errors == [], f"no script error after a refused request ({errors})")


def check_plain_model(wd, port):
    info = wait_loaded(wd, port)
    check("no chat template" in info, f"no template: the page says so ({info!r})")
    check(wd.js("return !document.getElementById('no-template').hidden;"),
          "no template: the fallback notice shows")
    answer, _ = chat(wd, "The ", 16, "no template")
    s, body = api(port, "POST", "/v1/completions",
                  {"prompt": "The ", "max_tokens": 16, "temperature": 0, "routing": True})
    want = json.loads(body)
    check(answer == want["choices"][0]["text"], f"no template: the answer is /v1/completions' ({answer!r})")
    _, palette = page_checks(wd, port)
    check_view(wd, "#chat-view", positions(want["routing"])[1], palette, 2, "no template")
    check(wd.console_errors() == [], "no template: no console error")


def check_big_model(wd, port, work):
    info = wait_loaded(wd, port)
    check("48 MoE layers" in info and "128 experts, top-8" in info, f"48 x 128: the page names it ({info!r})")
    model, palette = page_checks(wd, port)
    wd.click('nav button[data-tab="text"]')
    text = "A wide and deep model, drawn whole: " * 3
    r = route_text(wd, port, text)
    check_view(wd, "#text-view", r["routing"]["experts"], palette, model["top_k"], "48 x 128")
    scrolls = wd.js("const s = document.querySelector('#text-view .grid-scroll');"
                    "return s.scrollHeight > s.clientHeight && s.scrollWidth > s.clientWidth;")
    check(scrolls, "48 x 128: the grid scrolls both ways")
    check_tip(wd, "#text-view", r["tokens"], r["routing"]["experts"], 60, 40, "48 x 128")
    wd.screenshot(os.path.join(work, "serve_page_big.png"))
    check(wd.console_errors() == [], "48 x 128: no console error")


if __name__ == "__main__":
    sys.exit(main())
