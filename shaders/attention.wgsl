// Attention of this pass's queries over a layer's cache slot (f16 keys and values,
// [n_ctx][n_head_kv * head_dim], two halves per u32), causal: the query at cache row
// r sees rows 0..=r. Keys are visited in tiles of 64 with an online softmax (running
// max and sum), so no score row is ever materialized.
//
// `attn_tiled` does one (head, token) per workgroup: prefill, in f32, which is also
// what ggml's CPU flash attention does for batches of 64 queries or more. Decode has
// one token, so `attn_split` spreads its keys over workgroups (split-K
// flash-decoding), each writing (max, sum, unnormalized output) to PART, and
// `attn_combine` merges them. `attn_f16_serial` reproduces ggml's CPU path for
// smaller batches (f16 query, one key at a time, f16 output accumulator), for
// parity with the CPU backend.

struct AttnParams {
    n_head: u32,
    n_head_kv: u32,
    head_dim: u32,
    // Keys per attn_split workgroup.
    split_len: u32,
    scale: f32,
    // Splits the PART buffer holds room for, per head.
    max_splits: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> Q: array<f32>;
@group(0) @binding(1) var<storage, read> KC: array<u32>;
@group(0) @binding(2) var<storage, read> VC: array<u32>;
@group(0) @binding(3) var<uniform> P: AttnParams;
@group(0) @binding(5) var<storage, read_write> O: array<f32>;
@group(0) @binding(6) var<storage, read_write> PART: array<f32>;

const TILE: u32 = 64u;
// Up to 4 output dimensions per invocation.
const MAX_HEAD_DIM: u32 = 256u;
// A finite stand-in for -inf: exp(NEG_BIG - m) is 0 for any real m.
const NEG_BIG: f32 = -1.0e30;

var<workgroup> q_s: array<f32, MAX_HEAD_DIM>;
var<workgroup> p_s: array<f32, TILE>;

struct Partial {
    m: f32,
    l: f32,
    acc: vec4<f32>,
}

fn cache_half(buf_word: u32, d: u32) -> f32 {
    let v = unpack2x16float(buf_word);
    return select(v.x, v.y, (d & 1u) != 0u);
}

fn f16_round(v: f32) -> f32 {
    return unpack2x16float(pack2x16float(vec2<f32>(v, 0.0))).x;
}

fn load_query(t: u32, h: u32, li: u32, as_f16: bool) {
    let qb = (t * P.n_head + h) * P.head_dim;
    for (var d = li; d < P.head_dim; d += TILE) {
        let q = Q[qb + d];
        q_s[d] = select(q, f16_round(q), as_f16);
    }
    workgroupBarrier();
}

// q·k for cache row j, times the scale.
fn score(j: u32, row_words: u32, head_word: u32) -> f32 {
    let kb = j * row_words + head_word;
    var dotp = 0.0;
    for (var d = 0u; d < P.head_dim; d += 2u) {
        let kv = unpack2x16float(KC[kb + d / 2u]);
        dotp += q_s[d] * kv.x + q_s[d + 1u] * kv.y;
    }
    return dotp * P.scale;
}

// Online softmax over cache rows [k0, k1) for the query in q_s; invocation li
// accumulates output dimensions li, li+64, li+128, li+192.
fn attend(kvh: u32, k0: u32, k1: u32, li: u32) -> Partial {
    let row_words = P.n_head_kv * P.head_dim / 2u;
    let head_word = kvh * P.head_dim / 2u;
    var m = NEG_BIG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var t0 = k0; t0 < k1; t0 += TILE) {
        let j = t0 + li;
        var s = NEG_BIG;
        if (j < k1) {
            s = score(j, row_words, head_word);
        }
        p_s[li] = s;
        workgroupBarrier();
        var m_new = m;
        for (var i = 0u; i < TILE; i++) {
            m_new = max(m_new, p_s[i]);
        }
        workgroupBarrier();
        p_s[li] = select(0.0, exp(s - m_new), j < k1);
        workgroupBarrier();
        let alpha = exp(m - m_new);
        acc *= alpha;
        var psum = 0.0;
        let n_in = min(TILE, k1 - t0);
        for (var i = 0u; i < n_in; i++) {
            let p = p_s[i];
            psum += p;
            let vb = (t0 + i) * row_words + head_word;
            for (var c = 0u; c < 4u; c++) {
                let d = li + c * TILE;
                if (d < P.head_dim) {
                    acc[c] += p * cache_half(VC[vb + d / 2u], d);
                }
            }
        }
        l = l * alpha + psum;
        m = m_new;
        workgroupBarrier();
    }
    return Partial(m, l, acc);
}

@compute @workgroup_size(64)
fn attn_tiled(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let h = wid.x;
    let t = wid.y;
    let kvh = h / (P.n_head / P.n_head_kv);
    load_query(t, h, li, false);
    let r = attend(kvh, 0u, S.pos0 + t + 1u, li);
    let ob = (t * P.n_head + h) * P.head_dim;
    for (var c = 0u; c < 4u; c++) {
        let d = li + c * TILE;
        if (d < P.head_dim) {
            O[ob + d] = r.acc[c] / r.l;
        }
    }
}

// PART holds, per (head, split): m, l, then head_dim unnormalized outputs.
fn part_base(h: u32, split: u32) -> u32 {
    return (h * P.max_splits + split) * (P.head_dim + 2u);
}

// Decode only: the pass's single token (row pos0) against rows [split * split_len, ..).
@compute @workgroup_size(64)
fn attn_split(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let h = wid.x;
    let split = wid.y;
    let kvh = h / (P.n_head / P.n_head_kv);
    let n_keys = S.pos0 + 1u;
    let k0 = split * P.split_len;
    let k1 = min(k0 + P.split_len, n_keys);
    load_query(0u, h, li, false);
    let r = attend(kvh, k0, k1, li);
    let pb = part_base(h, split);
    if (li == 0u) {
        PART[pb] = r.m;
        PART[pb + 1u] = r.l;
    }
    for (var c = 0u; c < 4u; c++) {
        let d = li + c * TILE;
        if (d < P.head_dim) {
            PART[pb + 2u + d] = r.acc[c];
        }
    }
}

@compute @workgroup_size(64)
fn attn_combine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let h = wid.x;
    let n_splits = (S.pos0 + P.split_len) / P.split_len;
    var m = NEG_BIG;
    for (var s = 0u; s < n_splits; s++) {
        m = max(m, PART[part_base(h, s)]);
    }
    var l = 0.0;
    for (var s = 0u; s < n_splits; s++) {
        let pb = part_base(h, s);
        l += PART[pb + 1u] * exp(PART[pb] - m);
    }
    for (var d = li; d < P.head_dim; d += TILE) {
        var o = 0.0;
        for (var s = 0u; s < n_splits; s++) {
            let pb = part_base(h, s);
            o += PART[pb + 2u + d] * exp(PART[pb] - m);
        }
        O[h * P.head_dim + d] = o / l;
    }
}

// ggml's CPU flash attention for batches under 64 queries (its `one_chunk` path):
// f16 query; keys one at a time in order; the running output kept in f16, rescaled
// (y = f16(y * ms)) when the max grows, then y = f16(y + v * vs); the sum in f32.
@compute @workgroup_size(64)
fn attn_f16_serial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let h = wid.x;
    let t = wid.y;
    let kvh = h / (P.n_head / P.n_head_kv);
    let row_words = P.n_head_kv * P.head_dim / 2u;
    let head_word = kvh * P.head_dim / 2u;
    load_query(t, h, li, true);
    let n_keys = S.pos0 + t + 1u;
    var m = NEG_BIG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var t0 = 0u; t0 < n_keys; t0 += TILE) {
        let j = t0 + li;
        if (j < n_keys) {
            p_s[li] = score(j, row_words, head_word);
        }
        workgroupBarrier();
        let n_in = min(TILE, n_keys - t0);
        for (var i = 0u; i < n_in; i++) {
            let s = p_s[i];
            var ms = 1.0;
            var vs = 1.0;
            if (s > m) {
                ms = exp(m - s);
                m = s;
                for (var c = 0u; c < 4u; c++) {
                    acc[c] = f16_round(acc[c] * ms);
                }
            } else {
                vs = exp(s - m);
            }
            let vb = (t0 + i) * row_words + head_word;
            for (var c = 0u; c < 4u; c++) {
                let d = li + c * TILE;
                if (d < P.head_dim) {
                    acc[c] = f16_round(fma(cache_half(VC[vb + d / 2u], d), vs, acc[c]));
                }
            }
            l = l * ms + vs;
        }
        workgroupBarrier();
    }
    let ob = (t * P.n_head + h) * P.head_dim;
    let inv = 1.0 / l;
    for (var c = 0u; c < 4u; c++) {
        let d = li + c * TILE;
        if (d < P.head_dim) {
            O[ob + d] = acc[c] * inv;
        }
    }
}
