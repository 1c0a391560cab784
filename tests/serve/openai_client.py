"""Drives `kvsharer serve` with the official `openai` Python client.

Usage: openai_client.py BASE_URL MODEL_ID EXPECTED_CHAT_REPLY_FILE
Exits non-zero (with the reason) at the first check that fails. The expected reply
is what `kvsharer run --chat --temp 0` printed for the same question and length.
"""

import sys
import threading

import openai

base, model, expected_file = sys.argv[1], sys.argv[2], sys.argv[3]
expected = open(expected_file, encoding="utf-8").read().strip()
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
QUESTION = "What is the capital of France?"


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what.split(':')[0]}")


models = client.models.list()
check([m.id for m in models.data] == [model], f"models lists the model: {[m.id for m in models.data]}")

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
)
reply = chat.choices[0].message.content
check(reply.strip() == expected, f"greedy chat equals kvsharer run --chat: {reply!r} vs {expected!r}")
check(chat.usage.completion_tokens == 24 and chat.choices[0].finish_reason == "length",
      f"usage and finish_reason: {chat.usage}, {chat.choices[0].finish_reason}")

stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24,
    stream=True, stream_options={"include_usage": True},
)
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        pieces.append(c.delta.content or "")
        finish = c.finish_reason or finish
check("".join(pieces).strip() == expected, f"streamed chat equals the same reply: {''.join(pieces)!r}")
check(finish == "length" and usage is not None and usage.completion_tokens == 24,
      f"stream ends with finish_reason and usage: {finish}, {usage}")

comp = client.completions.create(model=model, prompt="Once upon a time", temperature=0, max_tokens=12)
check(len(comp.choices[0].text) > 0 and comp.usage.completion_tokens == 12,
      f"completions: {comp.choices[0].text!r}")

stop = client.completions.create(model=model, prompt="1, 2, 3, 4,", temperature=0, max_tokens=20, stop=[" 7"])
check(" 7" not in stop.choices[0].text and stop.choices[0].finish_reason == "stop",
      f"stop sequence cuts the text: {stop.choices[0].text!r} {stop.choices[0].finish_reason}")

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    check(False, "unknown model is refused")
except openai.NotFoundError as e:
    check(e.status_code == 404, f"unknown model is refused: {e}")

results, errors = {}, []


def stream_one(i):
    try:
        s = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Write a sentence about the number {i}."}],
            temperature=0.8, seed=i, max_tokens=32, stream=True,
        )
        text, fin = "", None
        for chunk in s:
            for c in chunk.choices:
                text += c.delta.content or ""
                fin = c.finish_reason or fin
        results[i] = (text, fin)
    except Exception as e:  # noqa: BLE001 - any failure of a client is the finding
        errors.append(f"client {i}: {e!r}")


threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
check(not errors, f"8 concurrent streaming clients: {errors}")
check(len(results) == 8 and all(f in ("stop", "length") and t for t, f in results.values()),
      f"8 concurrent streams all complete: {results}")
print("all checks passed")
