#!/usr/bin/env python3
"""Helpers of scripts/frontier.sh.

  frontier.py maps OUT   greedy-12/report.json -> map-4/8/12.json (share --map)
  frontier.py table OUT  every OUT/<text>-<config>.json -> a markdown table per text,
                         the goals of issue 14 checked, and frontier-<text>.svg
"""
import glob
import json
import math
import os
import sys


def replay(n_layers, pairs):
    """ShareMap::with_shared applied in order: chains resolved both ways."""
    src = list(range(n_layers))
    for layer, source in pairs:
        root = src[source]
        src = [root if s == layer else s for s in src]
    return src


def maps(out):
    r = json.load(open(os.path.join(out, "greedy-12", "report.json")))
    n = len(r["map"]["source"])
    kept = [t for t in r["trials"] if t["kept"]]
    kept.sort(key=lambda t: (t.get("step") if t.get("step") is not None else 0))
    pairs = [(t["layer"], t["source"]) for t in kept]
    for k in (4, 8, 12):
        if len(pairs) < k:
            sys.exit(f"the greedy search accepted only {len(pairs)} pairs, fewer than {k}")
        m = replay(n, pairs[:k])
        json.dump({"map": {"source": m}}, open(os.path.join(out, f"map-{k}.json"), "w"))
        print(f"N={k}: {m}", file=sys.stderr)


def label(config):
    if config.startswith("plan-adapted-"):
        return f"plan {config[13:]}% + value adapters"
    if config.startswith("plan-"):
        return f"plan {config[5:]}%"
    if config.startswith("share-"):
        budget, _, adapted = config[6:].partition("-")
        return f"plan {budget}%, sharing only (f16 slots)" + (" + value adapters" if adapted else "")
    n, k, v = config.split("-")
    n = int(n[1:])
    types = k if k == v else f"K {k} + V {v}"
    return f"{types}" + (f", {n} layers shared" if n else "")


def load(out):
    texts = {}
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        name = os.path.basename(path)[:-5]
        if "-" not in name or name.startswith(("map-", "calib-")):
            continue
        text, config = name.split("-", 1)
        try:
            d = json.load(open(path))
            c = d["comparison"]
        except (ValueError, KeyError, TypeError):
            continue
        texts.setdefault(text, []).append({
            "config": config,
            "label": label(config),
            "plan": config.startswith(("plan-", "share-")),
            "bytes": c["test_kv_bytes"] / c["base_kv_bytes"],
            "ppl": c["ppl_ratio"]["value"],
            "kld": c["kld"]["value"],
            "kld_unc": c["kld"]["uncertainty"],
            "top1": c["same_top"]["value"],
            "scored": c["scored"],
        })
    return texts


def svg(rows, title):
    w, h, pad = 760, 480, 64
    klds = [max(r["kld"], 1e-4) for r in rows]
    lo, hi = math.floor(math.log10(min(klds))), math.ceil(math.log10(max(klds)))
    hi = max(hi, lo + 1)
    x = lambda f: pad + f * (w - 2 * pad)
    y = lambda k: h - pad - (math.log10(max(k, 1e-4)) - lo) / (hi - lo) * (h - 2 * pad)
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="10">',
         '<rect width="100%" height="100%" fill="white"/>',
         f'<text x="{pad}" y="22" font-size="13">{title}: KV bytes vs mean KLD against the unshared f16 model (log)</text>',
         f'<line x1="{pad}" y1="{h-pad}" x2="{w-pad}" y2="{h-pad}" stroke="black"/>',
         f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h-pad}" stroke="black"/>']
    for pct in range(0, 101, 10):
        s.append(f'<text x="{x(pct/100):.1f}" y="{h-pad+14}" text-anchor="middle">{pct}%</text>')
    for e in range(lo, hi + 1):
        s.append(f'<line x1="{pad}" y1="{y(10**e):.1f}" x2="{w-pad}" y2="{y(10**e):.1f}" stroke="lightgray"/>'
                 f'<text x="{pad-4}" y="{y(10**e)+4:.1f}" text-anchor="end">1e{e}</text>')
    plans = sorted((r for r in rows if r["plan"]), key=lambda r: r["bytes"])
    if plans:
        pts = " ".join(f'{x(r["bytes"]):.1f},{y(r["kld"]):.1f}' for r in plans)
        s.append(f'<polyline points="{pts}" fill="none" stroke="crimson"/>')
    for r in rows:
        colour = "crimson" if r["plan"] else "steelblue"
        cx, cy = x(r["bytes"]), y(r["kld"])
        s.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{colour}"/>'
                 f'<text x="{cx+5:.1f}" y="{cy-4:.1f}" fill="{colour}">{r["label"]}</text>')
    s.append(f'<text x="{w/2}" y="{h-20}" text-anchor="middle">KV bytes, % of the unshared f16 cache (red: the planner, blue: uniform configurations)</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


def additivity(out):
    rows = []
    for path in glob.glob(os.path.join(out, "calib-plan-*.json")):
        try:
            d = json.load(open(path))
        except ValueError:
            continue
        d["adapters"] = "adapted" in os.path.basename(path)
        rows.append(d)
    if not rows:
        return
    rows.sort(key=lambda d: (-d["budget"], d["adapters"]))
    print("### The planner on its calibration set: predicted (sum of single moves) vs measured KLD\n")
    print("| budget | adapters | plan's bytes | shared K/V slots | slot types (K / V) | predicted KLD | measured KLD |")
    print("| ---: | --- | ---: | ---: | --- | ---: | ---: |")
    for d in rows:
        shared = sum(1 for l in d["layers"] for h in ("k", "v") if l[f"{h}_from"] != l["layer"])
        def counts(h):
            c = {}
            for l in d["layers"]:
                if l[f"{h}_from"] == l["layer"]:
                    c[l[f"{h}_type"]] = c.get(l[f"{h}_type"], 0) + 1
            return ", ".join(f"{t} x{n}" for t, n in sorted(c.items()))
        adapted = f"values ({len(d.get('adapted', []))} used)" if d["adapters"] else "none"
        print(f"| {100*d['budget']:.3g}% | {adapted} | {100*d['fraction']:.1f}% | {shared} | {counts('k')} / {counts('v')} | {d['predicted_kld']:.4f} | {d['measured_kld']:.4f} |")
    print()


def table(out):
    additivity(out)
    texts = load(out)
    for text, rows in sorted(texts.items()):
        rows.sort(key=lambda r: (-r["bytes"], r["kld"]))
        scored = rows[0]["scored"] if rows else 0
        print(f"### {text} ({scored} predictions per configuration)\n")
        print("| configuration | KV bytes vs f16 | PPL ratio | mean KLD | same top-1 |")
        print("| --- | ---: | ---: | ---: | ---: |")
        print("| unshared, f16 (reference) | 100.0% | 1.000 | 0.0000 | 100.0% |")
        for r in rows:
            name = f"**{r['label']}**" if r["plan"] else r["label"]
            print(f"| {name} | {100*r['bytes']:.1f}% | {r['ppl']:.3f} | {r['kld']:.4f} | {100*r['top1']:.1f}% |")
        print()
        uniform = [r for r in rows if not r["plan"]]
        for p in (r for r in rows if r["plan"]):
            rivals = [u for u in uniform if u["bytes"] >= p["bytes"] - 1e-9]
            q4 = next((u for u in uniform if u["config"] == "n0-q4_0-q4_0"), None)
            if p["config"].startswith("share-"):
                verdict = "met" if p["kld"] <= 0.10 else "missed"
                print(f"- {p['label']} ({100*p['bytes']:.1f}%): KLD {p['kld']:.4f}, goal <= 0.10: {verdict}")
            elif rivals:
                best = min(rivals, key=lambda u: u["kld"])
                near = min(rivals, key=lambda u: (u["bytes"], u["kld"]))
                verdict = "met" if p["kld"] < best["kld"] else "missed"
                verdict_near = "below" if p["kld"] < near["kld"] else "not below"
                print(f"- {p['label']} ({100*p['bytes']:.1f}%): KLD {p['kld']:.4f} vs the best uniform configuration with at least as many bytes, {best['label']} ({100*best['bytes']:.1f}%) at {best['kld']:.4f}: {verdict}; {verdict_near} the nearest larger one, {near['label']} ({100*near['bytes']:.1f}%) at {near['kld']:.4f}")
            elif q4:
                verdict = "met" if p["kld"] <= q4["kld"] else "missed"
                print(f"- {p['label']} ({100*p['bytes']:.1f}%): no uniform configuration this small; KLD {p['kld']:.4f} vs q4_0 at {100*q4['bytes']:.1f}% ({q4['kld']:.4f}): {verdict}")
        print()
        with open(os.path.join(out, f"frontier-{text}.svg"), "w") as f:
            f.write(svg(rows, text))


if __name__ == "__main__":
    {"maps": maps, "table": table}[sys.argv[1]](sys.argv[2])
