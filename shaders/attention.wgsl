// Attention of this pass's queries over a layer's cache slots (keys and values,
// [n_ctx][n_head_kv * head_dim] each, in their own types: the module prepends
// `kv_cache.wgsl` twice, for KC and VC, and the `k4` / `v1` readers of the slots'
// types), causal: the query stored at cache row r sees rows ROWS[t].y..=r (its
// sequence or packed text). Keys are visited in tiles of 64 with an online softmax (running
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
    // Bytes per cache row of the key and the value slot.
    k_row_bytes: u32,
    v_row_bytes: u32,
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

// q·k for cache row j (the key head starting at element `head`), times the scale.
fn score(j: u32, head: u32) -> f32 {
    let kb = j * P.k_row_bytes;
    var dotp = 0.0;
    for (var d = 0u; d < P.head_dim; d += 4u) {
        let k = kc4(kb, head + d);
        dotp += q_s[d] * k.x + q_s[d + 1u] * k.y;
        dotp += q_s[d + 2u] * k.z + q_s[d + 3u] * k.w;
    }
    return dotp * P.scale;
}

// Online softmax over cache rows [k0, k1) for the query in q_s; invocation li
// accumulates output dimensions li, li+64, li+128, li+192.
fn attend(kvh: u32, k0: u32, k1: u32, li: u32) -> Partial {
    let head = kvh * P.head_dim;
    var m = NEG_BIG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var t0 = k0; t0 < k1; t0 += TILE) {
        let j = t0 + li;
        var s = NEG_BIG;
        if (j < k1) {
            s = score(j, head);
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
            let vb = (t0 + i) * P.v_row_bytes;
            for (var c = 0u; c < 4u; c++) {
                let d = li + c * TILE;
                if (d < P.head_dim) {
                    acc[c] += p * vc1(vb, head + d);
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
    let r = attend(kvh, ROWS[t].y, ROWS[t].x + 1u, li);
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

// Decode only: the pass's single token (row ROWS[0].x) against rows
// [ROWS[0].y + split * split_len, ..),
// one query head per workgroup (GQA groups larger than MAX_GROUP; smaller ones take
// attn_split_group).
@compute @workgroup_size(64)
fn attn_split(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let h = wid.x;
    let split = wid.y;
    let kvh = h / (P.n_head / P.n_head_kv);
    let k0 = ROWS[0].y + split * P.split_len;
    let k1 = min(k0 + P.split_len, ROWS[0].x + 1u);
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

// Query heads sharing one KV head that attn_split_group takes together.
const MAX_GROUP: u32 = 8u;

var<workgroup> qg_s: array<f32, 2048>;  // MAX_GROUP * MAX_HEAD_DIM
var<workgroup> pg_s: array<f32, 512>;   // MAX_GROUP * TILE

// attn_split for every query head of one KV head at once (GQA groups of up to
// MAX_GROUP): each key and value element is read and dequantized once for the
// whole group, as the CPU's decode kernel does, instead of once per query head.
// Workgroup (KV head, split); it writes the same PART entries attn_split writes
// for each of its query heads, so attn_combine follows either.
@compute @workgroup_size(64)
fn attn_split_group(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let kvh = wid.x;
    let split = wid.y;
    let group = P.n_head / P.n_head_kv;
    let h0 = kvh * group;
    for (var g = 0u; g < group; g++) {
        for (var d = li; d < P.head_dim; d += TILE) {
            qg_s[g * P.head_dim + d] = Q[(h0 + g) * P.head_dim + d];
        }
    }
    workgroupBarrier();
    let k0 = ROWS[0].y + split * P.split_len;
    let k1 = min(k0 + P.split_len, ROWS[0].x + 1u);
    let head = kvh * P.head_dim;
    var m: array<f32, MAX_GROUP>;
    var l: array<f32, MAX_GROUP>;
    var acc: array<vec4<f32>, MAX_GROUP>;
    for (var g = 0u; g < MAX_GROUP; g++) {
        m[g] = NEG_BIG;
        l[g] = 0.0;
        acc[g] = vec4<f32>(0.0);
    }
    for (var t0 = k0; t0 < k1; t0 += TILE) {
        let j = t0 + li;
        // This invocation's key against every query head of the group.
        var s: array<f32, MAX_GROUP>;
        for (var g = 0u; g < MAX_GROUP; g++) {
            s[g] = NEG_BIG;
        }
        if (j < k1) {
            let kb = j * P.k_row_bytes;
            var dots: array<f32, MAX_GROUP>;
            for (var d = 0u; d < P.head_dim; d += 4u) {
                let k = kc4(kb, head + d);
                for (var g = 0u; g < group; g++) {
                    let q = g * P.head_dim + d;
                    dots[g] += qg_s[q] * k.x + qg_s[q + 1u] * k.y;
                    dots[g] += qg_s[q + 2u] * k.z + qg_s[q + 3u] * k.w;
                }
            }
            for (var g = 0u; g < group; g++) {
                s[g] = dots[g] * P.scale;
            }
        }
        for (var g = 0u; g < group; g++) {
            pg_s[g * TILE + li] = s[g];
        }
        workgroupBarrier();
        var alpha: array<f32, MAX_GROUP>;
        for (var g = 0u; g < group; g++) {
            var m_new = m[g];
            for (var i = 0u; i < TILE; i++) {
                m_new = max(m_new, pg_s[g * TILE + i]);
            }
            alpha[g] = exp(m[g] - m_new);
            m[g] = m_new;
        }
        workgroupBarrier();
        for (var g = 0u; g < group; g++) {
            pg_s[g * TILE + li] = select(0.0, exp(s[g] - m[g]), j < k1);
        }
        workgroupBarrier();
        for (var g = 0u; g < group; g++) {
            acc[g] *= alpha[g];
            l[g] *= alpha[g];
        }
        let n_in = min(TILE, k1 - t0);
        for (var i = 0u; i < n_in; i++) {
            let vb = (t0 + i) * P.v_row_bytes;
            for (var c = 0u; c < 4u; c++) {
                let d = li + c * TILE;
                if (d < P.head_dim) {
                    let v = vc1(vb, head + d);
                    for (var g = 0u; g < group; g++) {
                        acc[g][c] += pg_s[g * TILE + i] * v;
                    }
                }
            }
            for (var g = 0u; g < group; g++) {
                l[g] += pg_s[g * TILE + i];
            }
        }
        workgroupBarrier();
    }
    for (var g = 0u; g < group; g++) {
        let pb = part_base(h0 + g, split);
        if (li == 0u) {
            PART[pb] = m[g];
            PART[pb + 1u] = l[g];
        }
        for (var c = 0u; c < 4u; c++) {
            let d = li + c * TILE;
            if (d < P.head_dim) {
                PART[pb + 2u + d] = acc[g][c];
            }
        }
    }
}

@compute @workgroup_size(64)
fn attn_combine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let h = wid.x;
    let n_splits = (ROWS[0].x - ROWS[0].y + P.split_len) / P.split_len;
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

// ggml's CPU flash attention for batches under 64 queries (its `one_chunk` path)
// over f16 slots: f16 query; keys one at a time in order; the running output kept
// in f16, rescaled (y = f16(y * ms)) when the max grows, then y = f16(y + v * vs);
// the sum in f32.
@compute @workgroup_size(64)
fn attn_f16_serial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let h = wid.x;
    let t = wid.y;
    let kvh = h / (P.n_head / P.n_head_kv);
    let head = kvh * P.head_dim;
    load_query(t, h, li, true);
    let n_keys = ROWS[t].x + 1u;
    var m = NEG_BIG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var t0 = ROWS[t].y; t0 < n_keys; t0 += TILE) {
        let j = t0 + li;
        if (j < n_keys) {
            p_s[li] = score(j, head);
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
            let vb = (t0 + i) * P.v_row_bytes;
            for (var c = 0u; c < 4u; c++) {
                let d = li + c * TILE;
                if (d < P.head_dim) {
                    acc[c] = f16_round(fma(vc1(vb, head + d), vs, acc[c]));
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
