// Writes rows of keys or values (f32, [tokens][n_embd_kv] in SRC) into a cache
// slot in its type, at rows S.pos0 + ROWS[token].x: the forward pass's store
// (pos0 0, each token's own row) and the context shift's re-store of moved and
// re-rotated rows (ROWS counting up from 0, pos0 the destination).
// One entry point per type; the quantizers follow ggml's reference ones
// (quantize_row_q8_0_ref, _q4_0_ref, _q4_1_ref, _q5_0_ref, _q5_1_ref, _iq4_nl_ref),
// so a row stored here holds the bytes ggml's CPU backend would store, up to the
// rounding of ties.
//
// Quantized blocks (18 to 34 bytes) share u32 words with their neighbours, so
// every write there is a pair of atomics on the bytes it owns; f32 and f16 rows
// own whole words.

struct StoreParams {
    n_embd_kv: u32,
    row_bytes: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> SRC: array<f32>;
@group(0) @binding(2) var<storage, read_write> DST: array<atomic<u32>>;
@group(0) @binding(3) var<uniform> P: StoreParams;

// Sixteen bits at an even byte offset: always inside one word.
fn put_u16(off: u32, h: u32) {
    let w = off >> 2u;
    let s = (off & 2u) * 8u;
    atomicAnd(&DST[w], ~(0xffffu << s));
    atomicOr(&DST[w], (h & 0xffffu) << s);
}

fn f16_bits(v: f32) -> u32 {
    return pack2x16float(vec2<f32>(v, 0.0)) & 0xffffu;
}

// C's roundf: halves away from zero (WGSL's round takes them to even).
fn round_away(v: f32) -> f32 {
    return sign(v) * floor(abs(v) + 0.5);
}

@compute @workgroup_size(64)
fn store_f32(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= P.n_embd_kv) {
        return;
    }
    let t = gid.y;
    let row = (S.pos0 + ROWS[t].x) * P.n_embd_kv;
    atomicStore(&DST[row + i], bitcast<u32>(SRC[t * P.n_embd_kv + i]));
}

@compute @workgroup_size(64)
fn store_f16(@builtin(global_invocation_id) gid: vec3<u32>) {
    let pairs = P.n_embd_kv / 2u;
    let p = gid.x;
    if (p >= pairs) {
        return;
    }
    let t = gid.y;
    let src = t * P.n_embd_kv + 2u * p;
    atomicStore(&DST[(S.pos0 + ROWS[t].x) * pairs + p], pack2x16float(vec2<f32>(SRC[src], SRC[src + 1u])));
}

// One invocation per block of 32.
@compute @workgroup_size(64)
fn store_q8_0(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    if (b >= P.n_embd_kv / 32u) {
        return;
    }
    let t = gid.y;
    let src = t * P.n_embd_kv + b * 32u;
    var amax = 0.0;
    for (var j = 0u; j < 32u; j++) {
        amax = max(amax, abs(SRC[src + j]));
    }
    let d = amax / 127.0;
    let id = select(0.0, 1.0 / d, d != 0.0);
    let off = (S.pos0 + ROWS[t].x) * P.row_bytes + b * 34u;
    put_u16(off, f16_bits(d));
    for (var j = 0u; j < 32u; j += 2u) {
        let q0 = u32(i32(round_away(SRC[src + j] * id))) & 0xffu;
        let q1 = u32(i32(round_away(SRC[src + j + 1u] * id))) & 0xffu;
        put_u16(off + 2u + j, q0 | (q1 << 8u));
    }
}

@compute @workgroup_size(64)
fn store_q4_0(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    if (b >= P.n_embd_kv / 32u) {
        return;
    }
    let t = gid.y;
    let src = t * P.n_embd_kv + b * 32u;
    // The element of largest magnitude, with its sign, maps to -8.
    var amax = 0.0;
    var mx = 0.0;
    for (var j = 0u; j < 32u; j++) {
        let v = SRC[src + j];
        if (amax < abs(v)) {
            amax = abs(v);
            mx = v;
        }
    }
    let d = mx / -8.0;
    let id = select(0.0, 1.0 / d, d != 0.0);
    let off = (S.pos0 + ROWS[t].x) * P.row_bytes + b * 18u;
    put_u16(off, f16_bits(d));
    for (var j = 0u; j < 16u; j += 2u) {
        var pair = 0u;
        for (var k = 0u; k < 2u; k++) {
            let lo = min(15u, u32(SRC[src + j + k] * id + 8.5));
            let hi = min(15u, u32(SRC[src + 16u + j + k] * id + 8.5));
            pair |= (lo | (hi << 4u)) << (8u * k);
        }
        put_u16(off + 2u + j, pair);
    }
}

// Sixteen 4-bit codes per block: element j < 16 in the low nibble of byte j, element
// j + 16 in its high nibble; `codes` holds element e's code in the low 4 bits of
// codes[e].
fn put_nibbles(off: u32, codes: ptr<function, array<u32, 32>>) {
    for (var j = 0u; j < 16u; j += 2u) {
        let lo = ((*codes)[j] & 15u) | (((*codes)[j + 16u] & 15u) << 4u);
        let hi = ((*codes)[j + 1u] & 15u) | (((*codes)[j + 17u] & 15u) << 4u);
        put_u16(off + j, lo | (hi << 8u));
    }
}

// The fifth bits of 32 codes as the block's u32 qh (at an even offset).
fn put_high_bits(off: u32, codes: ptr<function, array<u32, 32>>) {
    var qh = 0u;
    for (var j = 0u; j < 32u; j++) {
        qh |= (((*codes)[j] >> 4u) & 1u) << j;
    }
    put_u16(off, qh & 0xffffu);
    put_u16(off + 2u, qh >> 16u);
}

// ggml's minimum and maximum of a block (quantize_row_q4_1_ref, _q5_1_ref).
fn block_min_max(src: u32) -> vec2<f32> {
    var lo = SRC[src];
    var hi = SRC[src];
    for (var j = 1u; j < 32u; j++) {
        lo = min(lo, SRC[src + j]);
        hi = max(hi, SRC[src + j]);
    }
    return vec2<f32>(lo, hi);
}

// The element of largest magnitude, with its sign (quantize_row_q4_0_ref, _q5_0_ref).
fn block_signed_max(src: u32) -> f32 {
    var amax = 0.0;
    var mx = 0.0;
    for (var j = 0u; j < 32u; j++) {
        let v = SRC[src + j];
        if (amax < abs(v)) {
            amax = abs(v);
            mx = v;
        }
    }
    return mx;
}

// Codes 0..=top for a block as `(x - min) / d` rounded, d = (max - min) / top
// (quantize_row_q4_1_ref with top 15, _q5_1_ref with 31); returns (d, min).
fn affine_codes(src: u32, top: u32, codes: ptr<function, array<u32, 32>>) -> vec2<f32> {
    let mm = block_min_max(src);
    let d = (mm.y - mm.x) / f32(top);
    let id = select(0.0, 1.0 / d, d != 0.0);
    for (var j = 0u; j < 32u; j++) {
        (*codes)[j] = min(top, u32((SRC[src + j] - mm.x) * id + 0.5));
    }
    return vec2<f32>(d, mm.x);
}

@compute @workgroup_size(64)
fn store_q4_1(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    if (b >= P.n_embd_kv / 32u) {
        return;
    }
    let t = gid.y;
    var codes: array<u32, 32>;
    let dm = affine_codes(t * P.n_embd_kv + b * 32u, 15u, &codes);
    let off = (S.pos0 + ROWS[t].x) * P.row_bytes + b * 20u;
    put_u16(off, f16_bits(dm.x));
    put_u16(off + 2u, f16_bits(dm.y));
    put_nibbles(off + 4u, &codes);
}

@compute @workgroup_size(64)
fn store_q5_0(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    if (b >= P.n_embd_kv / 32u) {
        return;
    }
    let t = gid.y;
    let src = t * P.n_embd_kv + b * 32u;
    let d = block_signed_max(src) / -16.0;
    let id = select(0.0, 1.0 / d, d != 0.0);
    var codes: array<u32, 32>;
    for (var j = 0u; j < 32u; j++) {
        codes[j] = min(31u, u32(SRC[src + j] * id + 16.5));
    }
    let off = (S.pos0 + ROWS[t].x) * P.row_bytes + b * 22u;
    put_u16(off, f16_bits(d));
    put_high_bits(off + 2u, &codes);
    put_nibbles(off + 6u, &codes);
}

@compute @workgroup_size(64)
fn store_q5_1(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    if (b >= P.n_embd_kv / 32u) {
        return;
    }
    let t = gid.y;
    var codes: array<u32, 32>;
    let dm = affine_codes(t * P.n_embd_kv + b * 32u, 31u, &codes);
    let off = (S.pos0 + ROWS[t].x) * P.row_bytes + b * 24u;
    put_u16(off, f16_bits(dm.x));
    put_u16(off + 2u, f16_bits(dm.y));
    put_high_bits(off + 4u, &codes);
    put_nibbles(off + 8u, &codes);
}

// ggml's `kvalues_iq4nl`: the 16 levels an iq4_nl code selects.
fn iq4nl_level(l: u32) -> f32 {
    var table = array<f32, 16>(
        -127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
        1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0,
    );
    return table[l];
}

// ggml's `best_index_int8` over those levels: the nearest, ties upward.
fn iq4nl_nearest(x: f32) -> u32 {
    if (x <= iq4nl_level(0u)) {
        return 0u;
    }
    if (x >= iq4nl_level(15u)) {
        return 15u;
    }
    var lo = 0u;
    var hi = 15u;
    while (hi - lo > 1u) {
        let mid = (lo + hi) / 2u;
        if (x < iq4nl_level(mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    return select(hi, hi - 1u, x - iq4nl_level(hi - 1u) < iq4nl_level(hi) - x);
}

// quantize_row_iq4_nl_ref (what ggml's CPU stores into a cache): the scale that
// maps the signed maximum to level 0, codes by nearest level, then the
// least-squares scale for those codes with weights x^2.
@compute @workgroup_size(64)
fn store_iq4_nl(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    if (b >= P.n_embd_kv / 32u) {
        return;
    }
    let t = gid.y;
    let src = t * P.n_embd_kv + b * 32u;
    let mx = block_signed_max(src);
    var codes: array<u32, 32>;
    var d = 0.0;
    if (abs(mx) >= 1e-15) {
        let id = 1.0 / (mx / -127.0);
        var sumqx = 0.0;
        var sumq2 = 0.0;
        for (var j = 0u; j < 32u; j++) {
            let x = SRC[src + j];
            let l = iq4nl_nearest(id * x);
            codes[j] = l;
            let q = iq4nl_level(l);
            let w = x * x;
            sumqx += w * q * x;
            sumq2 += w * q * q;
        }
        d = select(0.0, sumqx / sumq2, sumq2 > 0.0);
    }
    let off = (S.pos0 + ROWS[t].x) * P.row_bytes + b * 18u;
    put_u16(off, f16_bits(d));
    put_nibbles(off + 2u, &codes);
}
