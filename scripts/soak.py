"""A soak of `kvsharer serve`: mixed requests for a while, checking that no good
request fails and that the server's memory stays flat.

Usage: soak.py BASE_URL SERVER_PID MINUTES
Four client threads loop over: a streamed completion read to the end, a chat
answer, a stream dropped after its first events (a client that goes away), and a
bad request (malformed JSON, a wrong type, an unknown model, an over-long prompt)
that must get a 4xx. The server's RSS (/proc/PID/status) is sampled every 10 s;
"flat" means the largest RSS after the first quarter of the run is within 10% (and
16 MiB) of the RSS at the end of that quarter. Exits non-zero when a check fails.
"""

import http.client
import json
import random
import sys
import threading
import time
import urllib.parse

base, pid, minutes = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
url = urllib.parse.urlparse(base)
assert url.hostname in ("127.0.0.1", "localhost"), "soak.py talks to loopback only"
HOST, PORT = url.hostname, url.port
deadline = time.time() + 60 * minutes
lock = threading.Lock()
counts = {"good": 0, "good_failed": 0, "dropped": 0, "bad": 0, "bad_not_4xx": 0}
failures = []


def post(path, body, raw=False):
    conn = http.client.HTTPConnection(HOST, PORT, timeout=300)
    data = body if raw else json.dumps(body)
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def good_stream(rng):
    conn, r = post("/v1/completions", {"prompt": "Tell me about the sea.", "max_tokens": rng.randint(8, 96),
                                       "stream": True, "temperature": 0.9, "seed": rng.randint(0, 1 << 30)})
    body = r.read().decode("utf-8", "replace")
    conn.close()
    return r.status == 200 and "data: [DONE]" in body, f"stream: {r.status} {body[-200:]!r}"


def good_chat(rng):
    conn, r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}],
                                            "max_tokens": rng.randint(4, 48), "temperature": 0.7})
    body = r.read().decode("utf-8", "replace")
    conn.close()
    ok = r.status == 200 and "choices" in json.loads(body)
    return ok, f"chat: {r.status} {body[-200:]!r}"


def dropped(rng):
    conn, r = post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400, "stream": True})
    r.read1(256) if hasattr(r, "read1") else r.read(64)
    conn.close()  # goes away mid-stream


BAD = [
    ("{\"messages\": [", True),
    ({"messages": 5}, False),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, False),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, False),
    ({"prompt": "x", "max_tokens": -5}, False),
]


def bad(rng):
    body, raw = rng.choice(BAD)
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    conn, r = post(path, body, raw)
    text = r.read()
    conn.close()
    return 400 <= r.status < 500 and b"error" in text, f"bad request answered {r.status}"


def client(i):
    rng = random.Random(i)
    while time.time() < deadline:
        kind = rng.choice(["stream", "stream", "chat", "drop", "bad"])
        try:
            if kind == "drop":
                dropped(rng)
                with lock:
                    counts["dropped"] += 1
                continue
            ok, why = (good_stream if kind == "stream" else good_chat if kind == "chat" else bad)(rng)
            with lock:
                key = "bad" if kind == "bad" else "good"
                counts[key] += 1
                if not ok:
                    counts["bad_not_4xx" if kind == "bad" else "good_failed"] += 1
                    failures.append(why)
        except Exception as e:  # noqa: BLE001 - any exception on a good request is a failure
            with lock:
                counts["good_failed"] += 1
                failures.append(repr(e))


threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
samples = []
start = time.time()
while any(t.is_alive() for t in threads):
    samples.append((time.time() - start, rss_kib()))
    time.sleep(10)
for t in threads:
    t.join()
quarter = max(1, len(samples) // 4)
warm = samples[quarter - 1][1]
peak_after = max(r for _, r in samples[quarter - 1:])
growth = peak_after - warm
flat = growth <= max(0.10 * warm, 16 * 1024)
print(f"soak: {minutes} min | {counts['good']} good requests, {counts['good_failed']} failed | "
      f"{counts['dropped']} dropped mid-stream | {counts['bad']} bad requests, {counts['bad_not_4xx']} not 4xx")
print(f"RSS: {samples[0][1] // 1024} MiB at start, {warm // 1024} MiB after warm-up "
      f"({samples[quarter - 1][0]:.0f} s), peak after it {peak_after // 1024} MiB, "
      f"end {samples[-1][1] // 1024} MiB -> {'flat' if flat else 'GROWING'}")
for f in failures[:5]:
    print(f"  failure: {f}")
ok = counts["good_failed"] == 0 and counts["bad_not_4xx"] == 0 and flat
print("soak: " + ("passed" if ok else "FAILED"))
sys.exit(0 if ok else 1)
