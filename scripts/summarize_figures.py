#!/usr/bin/env python3
"""Turns the JSON files written by scripts/figures.sh into the Markdown tables of README."""
import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "figures"


def load(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            return None  # a run still writing, or one that failed


def mib(n):
    return f"{n / 1048576:.1f} MiB"


def ppl_row(label, name):
    j = load(f"ppl-{name}.json")
    if j is None:
        return f"| {label} | (missing) | | | | |"
    c = j.get("comparison")
    if c:
        ppl = c["ppl_test"]
        return (f"| {label} | {ppl['value']:.3f} ± {ppl['uncertainty']:.3f} | {c['ppl_ratio']['value']:.3f} | "
                f"{c['kld']['value']:.4f} ± {c['kld']['uncertainty']:.4f} | {100 * c['same_top']['value']:.1f}% | "
                f"{mib(c['test_kv_bytes'])} |")
    p = j["perplexity"]
    return (f"| {label} | {p['ppl']['value']:.3f} ± {p['ppl']['uncertainty']:.3f} | 1.000 | 0 | 100% | "
            f"{mib(p['kv_bytes'])} |")


base = load("ppl-base.json")
if base:
    b = base["perplexity"]
    print(f"Held-out text: `data/heldout.txt`, {b['n_chunks']} chunks of {b['n_ctx']} tokens "
          f"(scoring the second half of each), threads as run.\n")

print("| map | PPL | PPL / unshared | mean KLD | same top-1 | KV cache (ctx 512) |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
print(ppl_row("unshared (N = 0)", "base"))
for n in (4, 8, 12):
    for variant, label in (("dissimilar", "paper, dissimilar-first"), ("similar", "similar-first"),
                           ("random", "random map")):
        print(ppl_row(f"N = {n}, {label}", f"{variant}-{n}"))

secs = os.path.join(out, "calibrate-8.seconds")
if os.path.exists(secs):
    with open(secs) as f:
        t = float(f.read().strip().splitlines()[-1])
    with open(os.path.join(out, "calibrate-8.map")) as f:
        m = json.loads(f.read().strip())
    pairs = " ".join(f"{i}<-{s}" for i, s in enumerate(m) if i != s)
    print(f"\nCalibration for `--layers 8` (paper's search, 30 samples x 64 tokens): {t:.1f} s wall; map: `{pairs}`")


def bench_line(name, label):
    j = load(f"bench-d4096-{name}.json")
    if j is None:
        return f"| {label} | (missing) | | | |"
    r = {x["runtime"]: x for x in j["results"]}
    ours = r.get("kvsharer")
    theirs = r.get("llama.cpp")
    ratio = ours["tokens_per_s_mean"] / theirs["tokens_per_s_mean"] if ours and theirs else float("nan")
    return (f"| {label} | {ours['tokens_per_s_mean']:.2f} ± {ours['tokens_per_s_sd']:.2f} | "
            f"{theirs['tokens_per_s_mean']:.2f} ± {theirs['tokens_per_s_sd']:.2f} | {ratio:.3f} | "
            f"{mib(j['kv_bytes'])} | {mib(j['llama_cpp_kv_bytes'])} |")


print("\nDecode at depth 4096 (tg64 after 4096 tokens), llama.cpp in the same run with the same cache types "
      "(the 8-layer rows use the paper's N = 8 map: speed and KV bytes depend on how many layers are shared, not which):\n")
print("| configuration | kvsharer t/s | llama.cpp t/s | ratio | kvsharer KV | llama.cpp KV |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for name, label in (("base", "unshared, f16"), ("s8", "8 of 30 shared, f16"), ("q8", "unshared, q8_0"),
                    ("s8-q8", "8 shared, q8_0"), ("s8-q4", "8 shared, q4_0"),
                    ("s8-q8-vs-f16", "8 shared, q8_0 (llama.cpp: f16)")):
    print(bench_line(name, label))

print("\nSharing (8 of 30 layers, map by the default greedy KLD search) combined with quantized caches and a window "
      "(KLD against the unshared f16 model; KV cache at ctx 512, the window holds 256 cells):\n")
print("| configuration | PPL | PPL / unshared | mean KLD | same top-1 | KV cache (ctx 512) |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for name, label in (("base", "unshared f16"), ("g8", "25% shared f16"), ("q8", "unshared q8_0"),
                    ("g8-q8", "25% shared q8_0"), ("g8-q4", "25% shared q4_0")):
    print(ppl_row(label, name))
    print(ppl_row(label + ", window 252 + sink 4", name + "-w256"))
