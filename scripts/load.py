"""K concurrent streaming clients for T seconds against an OpenAI-compatible server.

Usage: load.py BASE_URL K SECONDS MAX_TOKENS [--label NAME] [--json OUT]
Each client sends /v1/completions requests (stream, fixed length via ignore_eos, a
seed per request) back to back until the time is up; a request started before the
deadline is finished. Prints one line: requests, failures, p50/p99 time to first
token, generated tokens/s over the whole run. Standard library only; loopback only.
"""

import argparse
import http.client
import json
import threading
import time
import urllib.parse

PROMPTS = [
    "Write a short story about a lighthouse keeper who",
    "The three most important things about baking bread are",
    "In a distant valley, the villagers discovered that",
    "Here is a list of reasons to learn a second language:",
    "The old clock in the hallway had stopped, and",
    "Explain to a child how rain forms:",
]


def one_request(host, port, path, body):
    """Returns (time to first token, tokens generated) or raises."""
    conn = http.client.HTTPConnection(host, port, timeout=300)
    t0 = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    ttft, chunks, usage, done = None, 0, None, False
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"error event: {event['error']}")
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            if choice.get("text"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                chunks += 1
    conn.close()
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    tokens = usage["completion_tokens"] if usage else chunks
    return ttft if ttft is not None else time.perf_counter() - t0, tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("clients", type=int)
    ap.add_argument("seconds", type=float)
    ap.add_argument("max_tokens", type=int)
    ap.add_argument("--label", default="")
    ap.add_argument("--json")
    a = ap.parse_args()
    url = urllib.parse.urlparse(a.base)
    assert url.hostname in ("127.0.0.1", "localhost", "::1"), "load.py talks to loopback only"
    path = url.path.rstrip("/") + "/completions"
    lock = threading.Lock()
    ttfts, tokens, failures, requests = [], [0], [], [0]
    deadline = time.perf_counter() + a.seconds

    def client(i):
        n = 0
        while time.perf_counter() < deadline:
            body = {"prompt": PROMPTS[(i + n) % len(PROMPTS)], "max_tokens": a.max_tokens,
                    "temperature": 0.8, "seed": 1000 * i + n, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            n += 1
            try:
                ttft, got = one_request(url.hostname, url.port, path, body)
                with lock:
                    ttfts.append(ttft)
                    tokens[0] += got
                    requests[0] += 1
            except Exception as e:  # noqa: BLE001 - a failed request is what we count
                with lock:
                    failures.append(repr(e))
                    requests[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ttfts.sort()
    pct = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")  # noqa: E731
    result = {"label": a.label, "clients": a.clients, "seconds": round(elapsed, 1),
              "requests": requests[0], "failures": len(failures),
              "ttft_p50_ms": round(1000 * pct(0.5), 1), "ttft_p99_ms": round(1000 * pct(0.99), 1),
              "tokens": tokens[0], "tokens_per_s": round(tokens[0] / elapsed, 2)}
    print(f"{a.label:>24} | {a.clients} clients | {result['requests']} requests | "
          f"{result['failures']} failed | TTFT p50 {result['ttft_p50_ms']} ms p99 {result['ttft_p99_ms']} ms | "
          f"{result['tokens']} tokens | {result['tokens_per_s']} tok/s")
    for f in failures[:5]:
        print(f"    failure: {f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
