// Writes rows of keys or values (f32, [tokens][n_embd_kv] in SRC) into a cache
// slot in its type, at rows S.pos0 + token: the forward pass's store (pos0 the
// pass's position) and the context shift's re-store of moved and re-rotated rows.
// One entry point per type; the quantizers follow ggml's reference ones
// (quantize_row_q8_0_ref, quantize_row_q4_0_ref), so a row stored here holds the
// bytes ggml's CPU backend would store, up to the rounding of ties.
//
// Quantized blocks (34 and 18 bytes) share u32 words with their neighbours, so
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
    let row = (S.pos0 + t) * P.n_embd_kv;
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
    atomicStore(&DST[(S.pos0 + t) * pairs + p], pack2x16float(vec2<f32>(SRC[src], SRC[src + 1u])));
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
    let off = (S.pos0 + t) * P.row_bytes + b * 34u;
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
    let off = (S.pos0 + t) * P.row_bytes + b * 18u;
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
