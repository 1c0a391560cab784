"""Renders chat templates with Python's jinja2 the way Hugging Face's
`apply_chat_template` does (trim_blocks, lstrip_blocks, loop controls,
raise_exception, strftime_now, tojson without ASCII escaping): the reference for
kvsharer's minijinja rendering.

Usage: render_jinja.py CASES.json  -> prints a JSON list of rendered strings
(or {"error": message}) in the order of the cases.
CASES.json: [{"template": str, "bos_token": str, "eos_token": str,
              "messages": [...], "add_generation_prompt": bool}, ...]
"""

import datetime
import json
import sys

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = strftime_now

out = []
for case in json.load(open(sys.argv[1], encoding="utf-8")):
    try:
        t = env.from_string(case["template"])
        out.append(t.render(messages=case["messages"], add_generation_prompt=case["add_generation_prompt"],
                            bos_token=case["bos_token"], eos_token=case["eos_token"], tools=None))
    except Exception as e:  # noqa: BLE001 - the error is part of what is compared
        out.append({"error": str(e)})
print(json.dumps(out))
