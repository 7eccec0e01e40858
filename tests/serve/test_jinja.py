#!/usr/bin/python3
"""Chat templates: `moe template` against Python's jinja2 configured as transformers configures
it for apply_chat_template (an immutable sandbox with trim_blocks, lstrip_blocks and loop
controls, its own tojson, raise_exception and strftime_now). Every case must render to the same
text: the real templates of Qwen3, DeepSeek-V3, Mistral NeMo (Mistral's template with tool
calls, as Mixtral 8x22B's; from their tokenizer_config.json, fetched at test setup) and gpt-oss
(the harmony format, from a folder's chat_template.jinja as gpt-oss ships it) over conversations with system prompts, reasoning, tool definitions, tool calls and
tool results; and templates written here for each construct the engine supports. Constructs it
does not support must be refused by name, with the line.

    tests/serve/test_jinja.py --moe build/release/moe --tokenizers build/release/real_tokenizers
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

FAILURES = []


def hf_environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


ENV = hf_environment()


def render_py(source, ctx):
    try:
        return True, ENV.from_string(source).render(**ctx)
    except jinja2.exceptions.TemplateError as e:
        return False, str(e)


def render_cpp(moe, source, ctx, work):
    t = os.path.join(work, "t.jinja")
    c = os.path.join(work, "c.json")
    with open(t, "w") as f:
        f.write(source)
    with open(c, "w") as f:
        json.dump(ctx, f, ensure_ascii=False)
    r = subprocess.run([moe, "template", "--template", t, "--context", c], capture_output=True)
    if r.returncode == 0:
        return True, r.stdout.decode("utf-8")
    return False, r.stderr.decode("utf-8", "replace").strip()


def check(cond, what, detail=""):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)
        if detail:
            print(detail)


def same(moe, work, what, source, ctx):
    ok_py, want = render_py(source, ctx)
    ok_cpp, got = render_cpp(moe, source, ctx, work)
    if ok_py:
        check(ok_cpp and got == want, what,
              f"--- jinja2:\n{want!r}\n--- moe:\n{got!r}")
    else:  # the template raised: we must fail too, with its message
        check(not ok_cpp and want in got, what + " (raises)", f"jinja2: {want}\nmoe: {got}")


# ---------------------------------------------------------------------------------------------
# Templates written for each construct

CTX = {
    "name": "World", "x": 1, "y": None, "items": [1, 2, 3], "empty": [],
    "d": {"b": 2, "a": 1, "c": [1, {"z": "é\"\n\t"}]},
    "people": [{"name": "Ann", "age": 31, "role": "user"}, {"name": "Bob", "age": 25, "role": "assistant"},
               {"name": "Cy", "age": 40, "role": "user"}],
    "text": "  Hello, wörld!\n  Second line  ", "f": 2.5, "big": 12345678901234, "neg": -7,
}

FEATURES = [
    ("plain text and output", "Hello {{ name }}!"),
    ("trim_blocks and lstrip_blocks", "a\n  {% if x %}\n  yes\n  {% endif %}\nb\n"),
    ("whitespace control", "a  \n  {%- if x -%}  \n yes \n  {%- endif %}  \n{{- '!' -}}  \nb"),
    ("lstrip off with +", "a\n  {%+ if x %}yes{% endif %}\n"),
    ("trim off with +", "a\n{% if x +%}\nyes{% endif %}\n"),
    ("comments", "a {# inline #} b\n  {# own line #}\nc {#- stripped -#}  d"),
    ("variable tags keep their line", "a\n  {{ name }}\n"),
    ("a trailing newline dropped", "x\n"),
    ("raw", "{% raw %}{{ not evaluated }} {% if %}{% endraw %}!"),
    ("integer arithmetic", "{{ 1 + 2 * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ neg - 3 }}"),
    ("float arithmetic", "{{ 1 / 4 }} {{ 3.0 }} {{ 1e3 }} {{ 0.1 + 0.2 }} {{ f * 2 }} {{ 10 / 2 }} {{ 2.5 // 1 }}"),
    ("strings", "{{ 'a' ~ 1 ~ none ~ true }} {{ 'abc'[1] }} {{ 'abcdef'[1:4] }} {{ 'abcdef'[::-1] }} "
     "{{ 'abcdef'[-2:] }} {{ 'héllo'[1:3] }} {{ 'ab' * 3 }} {{ \"it's\" }} {{ 'tab\\there' }}"),
    ("string methods", "{{ text.strip() }}|{{ text.lstrip() }}|{{ text.rstrip() }}|{{ 'xxhixx'.strip('x') }}|"
     "{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}|{{ 'a b c'.split(' ', 1) }}|{{ 'Hello'.upper() }}|"
     "{{ 'Hello'.lower() }}|{{ 'x'.startswith(('a', 'x')) }}|{{ 'abc'.endswith('bc') }}|"
     "{{ 'aXbX'.replace('X', '-') }}|{{ 'hello world'.title() }}|{{ 'hELLO'.capitalize() }}|"
     "{{ 'banana'.count('an') }}|{{ 'banana'.find('n') }}|{{ '-'.join(['a', 'b']) }}"),
    ("values printed as Python does", "{{ [1, 'a', none, true, 1.5, \"it's\"] }} {{ {'a': 1, 'b': [2]} }} "
     "{{ (1, 2) }} {{ none }} {{ false }} {{ d }} {{ big }} {{ undefined_name }}"),
    ("tests", "{{ x is defined }} {{ y is none }} {{ 3 is odd }} {{ 4 is even }} {{ 'a' is string }} "
     "{{ d is mapping }} {{ items is iterable }} {{ 4 is divisibleby 2 }} {{ nope is not defined }} "
     "{{ x is number }} {{ f is float }} {{ x is integer }} {{ y is not none }} {{ 'ab' is lower }} "
     "{{ 2 is in [1, 2] }} {{ true is true }} {{ x is eq 1 }}"),
    ("comparisons and logic", "{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 1 == 1.0 }} {{ 'a' != 'b' }} "
     "{{ not x }} {{ x and 'yes' }} {{ y or 'dflt' }} {{ 'b' in 'abc' }} {{ 2 not in items }} "
     "{{ 'a' in d }} {{ [1, 2] == [1, 2] }} {{ 'abc' < 'abd' }}"),
    ("conditional expressions", "{{ 'y' if x else 'n' }}|{{ 'y' if y }}|{{ 'a' if y else 'b' if x else 'c' }}"),
    ("attribute and item access", "{{ d.b }} {{ d['a'] }} {{ d.c[1].z }} {{ d.missing }}|{{ items[-1] }} "
     "{{ items[10] }}|{{ people[0].name }} {{ d.get('a') }} {{ d.get('q', 'none here') }}"),
    ("filters on strings", "{{ text|trim }}|{{ name|length }}|{{ name|upper }}|{{ name|lower }}|"
     "{{ 'ab cd'|title }}|{{ 'ab'|capitalize }}|{{ 'aXa'|replace('a', 'b') }}|{{ 3|string }}|"
     "{{ '<&>'|e }}|{{ 'x'|safe }}|{{ 'one two  three'|wordcount }}|{{ '42'|int + 1 }}|"
     "{{ 'x'|int }}|{{ '2.5'|float }}|{{ -3|abs }}|{{ 2.567|round(2) }}|{{ 'a\nb\n\nc'|indent(2) }}|"
     "{{ 'a\nb'|indent(2, true) }}"),
    ("filters on lists and dicts", "{{ items|length }} {{ items|first }} {{ items|last }} {{ items|join(', ') }} "
     "{{ items|sum }} {{ items|reverse|list }} {{ [3, 1, 2]|sort }} {{ [3, 1, 2]|sort(reverse=true) }} "
     "{{ [1, 2, 1]|unique|list }} {{ d|dictsort }} {{ d|items|list }} {{ empty|first }} "
     "{{ people|map(attribute='name')|join('/') }} {{ people|selectattr('role', 'equalto', 'user')|map(attribute='name')|list }} "
     "{{ people|rejectattr('age', 'gt', 30)|map(attribute='name')|list }} {{ [0, 1, 2]|select|list }} "
     "{{ [1, 2, 3, 4]|select('odd')|list }} {{ [1, 2, 3]|reject('even')|list }} "
     "{{ people|sort(attribute='age')|map(attribute='name')|list }} {{ people|sum(attribute='age') }} "
     "{{ ['a', 'b']|map('upper')|list }} {{ nope|default('dflt') }} {{ ''|default('dflt', true) }} "
     "{{ nope|d('x') }} {{ d|length }} {{ d|list }} {{ 'abc'|list }} {{ people|join(', ', attribute='name') }}"),
    ("tojson", "{{ d|tojson }}\n{{ d|tojson(indent=2) }}\n{{ people[0]|tojson(sort_keys=true) }}\n"
     "{{ [1.5, none, true, 'ü\\u0001', {}] |tojson }}\n{{ 'x'|tojson }}\n{{ []|tojson(indent=4) }}"),
    ("for loops and loop variables", "{% for i in items %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.revindex }}/"
     "{{ loop.revindex0 }}/{{ loop.length }}/{{ loop.first }}/{{ loop.last }}/{{ loop.previtem }}/{{ loop.nextitem }}/"
     "{{ loop.cycle('a', 'b') }} {% endfor %}"),
    ("for else, filters, break and continue", "{% for i in empty %}x{% else %}none{% endfor %}|"
     "{% for i in items if i != 2 %}{{ i }}:{{ loop.index }} {% endfor %}|"
     "{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i > 4 %}{% break %}{% endif %}{{ i }}{% endfor %}"),
    ("unpacking and nested loops", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|"
     "{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}|"
     "{% for p in people %}{% for c in p.name %}{{ c }}{% endfor %}-{{ loop.index }} {% endfor %}|"
     "{% for k in d %}{{ k }}{% endfor %}"),
    ("set and scoping", "{% set a = 1 %}{% for i in items %}{% set a = a + i %}{% endfor %}{{ a }}|"
     "{% set ns = namespace(total=0, seen=[]) %}{% for i in items %}{% set ns.total = ns.total + i %}{% endfor %}"
     "{{ ns.total }}|{% if x %}{% set b = 'in if' %}{% endif %}{{ b }}|{% set p, q = 1, 2 %}{{ p }}{{ q }}|"
     "{% set block %}A{{ x }}B{% endset %}{{ block }}"),
    ("macros", "{% macro greet(who, punct='!') %}Hi {{ who }}{{ punct }}{% endmacro %}"
     "{{ greet('Ann') }} {{ greet('Bob', '?') }} {{ greet(punct='.', who='Cy') }}"),
    ("range", "{{ range(3)|list }} {{ range(1, 7, 2)|list }} {{ range(5, 0, -2)|list }}"),
    ("raise_exception", "{% if x %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"),
    ("undefined attribute raises", "{{ nope.attr }}"),
    ("dict literals and membership", "{% set m = {'k': 'v', 'n': 1} %}{{ m.k }}{{ m['n'] }}{{ 'k' in m }}{{ m|tojson }}"),
]

UNSUPPORTED = [
    ("{% include 'other.jinja' %}", "'{% include %}' is not supported"),
    ("{% call greet() %}x{% endcall %}", "'{% call %}' is not supported"),
    ("{{ x|pprint }}", "the filter 'pprint' is not supported"),
    ("{{ x is escaped }}", "the test 'escaped' is not supported"),
    ("{% for i in items recursive %}{% endfor %}", "recursive for loops are not supported"),
    ("a\n{% if x %}", "{% if %} is never closed"),
    ("{{ x + }}", "unexpected the end of the tag"),
    # Bounded costs: no template exhausts the stack or runs without end.
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "macro calls nested more than 100 deep"),
    ("{{ " + "(" * 1000 + "1" + ")" * 1000 + " }}", "expressions nested too deeply"),
    ("{% if x %}" * 300 + "{% endif %}" * 300, "statements nested too deeply"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "the template takes too many steps"),
]

# ---------------------------------------------------------------------------------------------
# Conversations for the real templates

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "the city"}},
                                               "required": ["city"]}}}]
CONVERSATIONS = {
    "one user message": [{"role": "user", "content": "Hello!"}],
    "system and user": [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "Name a prime. Réponds en français."}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
                   {"role": "user", "content": "Tell me a joke.\nA short one."}],
    "reasoning in the history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nEasy: four.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"}],
    "tool call and result": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call00001", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call00001"},
        {"role": "assistant", "content": "It is 18 C and sunny."},
        {"role": "user", "content": "Thanks"}],
}


def conversation_cases(key, bos, eos):
    for name, msgs in CONVERSATIONS.items():
        if key in ("qwen3", "gpt_oss"):  # these read a message's content as a string
            msgs = [dict(m, content=m["content"] if m["content"] is not None else "") for m in msgs]
        for gen in (True, False):
            ctx = {"messages": msgs, "add_generation_prompt": gen, "bos_token": bos, "eos_token": eos,
                   "tools": None}
            yield f"{name}, add_generation_prompt={gen}", ctx
        if "tool" in name:
            yield f"{name}, with tool definitions", {"messages": msgs, "add_generation_prompt": True,
                                                     "bos_token": bos, "eos_token": eos, "tools": TOOLS}
    if key == "gpt_oss":  # the harmony format's own settings and fields
        base = {"add_generation_prompt": True, "bos_token": bos, "eos_token": eos}
        yield "reasoning_effort, model_identity, builtin_tools", dict(
            base, messages=CONVERSATIONS["system and user"], reasoning_effort="high",
            model_identity="You are Moe.", builtin_tools=["browser", "python"])
        yield "developer message and thinking in the history", dict(base, messages=[
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "Four.", "thinking": "Easy: 4."},
            {"role": "user", "content": "3+3?"}])
        yield "thinking before a tool call", dict(base, tools=TOOLS, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "thinking": "I should call the tool.",
             "tool_calls": [{"id": "call00001", "type": "function", "function": {
                 "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call00001"}])
        yield "raises on channel tags in the content", dict(base, messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<|channel|>analysis<|message|>x"},
            {"role": "user", "content": "again"}])
    if key == "qwen3":
        yield "enable_thinking false", {"messages": CONVERSATIONS["one user message"],
                                        "add_generation_prompt": True, "enable_thinking": False,
                                        "bos_token": bos, "eos_token": eos}


def token_text(t):
    return t.get("content", "") if isinstance(t, dict) else (t or "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe", required=True)
    ap.add_argument("--tokenizers", required=True, help="fetch_tokenizers.sh's folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        for what, source in FEATURES:
            same(args.moe, work, what, source, CTX)
        for source, message in UNSUPPORTED:
            ok, got = render_cpp(args.moe, source, CTX, work)
            check(not ok and message in got and "line" in got, f"refused: {message}", got)
        for key in ("qwen3", "deepseek_v3", "mistral_nemo", "gpt_oss"):
            path = os.path.join(args.tokenizers, key, "config", "tokenizer_config.json")
            if key == "gpt_oss":
                # A folder as gpt-oss ships it: the template in chat_template.jinja beside the
                # tokenizer's tokenizer_config.json (special tokens, no template).
                folder = os.path.join(work, "gpt_oss")
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, "tokenizer_config.json")
                shutil.copy(os.path.join(args.tokenizers, "gptoss", "config",
                                         "tokenizer_config.json"), path)
                shutil.copy(os.path.join(args.tokenizers, "templates", "openai-gpt-oss-120b.jinja"),
                            os.path.join(folder, "chat_template.jinja"))
            with open(path) as f:
                cfg = json.load(f)
            if key == "gpt_oss":
                with open(os.path.join(os.path.dirname(path), "chat_template.jinja")) as f:
                    cfg["chat_template"] = f.read()
            source = cfg["chat_template"]
            bos, eos = token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token"))
            for what, ctx in conversation_cases(key, bos, eos):
                same(args.moe, work, f"{key}: {what}", source, ctx)
            # The checkpoint-folder path: moe template -m DIR --messages.
            msgs = os.path.join(work, "m.json")
            with open(msgs, "w") as f:
                json.dump(CONVERSATIONS["system and user"], f)
            r = subprocess.run([args.moe, "template", "-m", os.path.dirname(path), "--messages", msgs],
                               capture_output=True)
            want = render_py(source, {"messages": CONVERSATIONS["system and user"],
                                      "add_generation_prompt": True, "bos_token": bos,
                                      "eos_token": eos, "tools": None})[1]
            check(r.returncode == 0 and r.stdout.decode() == want,
                  f"{key}: moe template -m DIR --messages", r.stderr.decode())
    print(f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
