// Reading KV cache rows in place, in ggml's layouts: f32; f16 (two per u32);
// q8_0 (blocks of 32: f16 scale d, 32 i8 q; value q * d); q4_0 (blocks of 32: f16
// scale d, 16 bytes of nibbles, element j < 16 the low nibble of byte j and element
// j + 16 its high nibble; value (q - 8) * d); q4_1, q5_0, q5_1 and iq4_nl (below).
// A row of n elements is n / 32 blocks, rows follow each other without padding. `base` is a row's first byte and `i` an
// element of the row (a multiple of 4 for the 4-wide reads).
//
// A template: the including module replaces CACHE with its buffer's name and the
// `cache` prefix of every function with one of its own, once per cache it reads.
// The buffer carries one word of padding after its last row (see `kv::Slot`).

fn cache_u32(off: u32) -> u32 {
    let w = off >> 2u;
    let s = (off & 3u) * 8u;
    if (s == 0u) {
        return CACHE[w];
    }
    return (CACHE[w] >> s) | (CACHE[w + 1u] << (32u - s));
}

// An f16 at an even byte offset (every block size here is even).
fn cache_f16(off: u32) -> f32 {
    let v = unpack2x16float(CACHE[off >> 2u]);
    return select(v.x, v.y, (off & 2u) != 0u);
}

fn cache4_f32(base: u32, i: u32) -> vec4<f32> {
    let w = (base >> 2u) + i;
    return vec4<f32>(
        bitcast<f32>(CACHE[w]),
        bitcast<f32>(CACHE[w + 1u]),
        bitcast<f32>(CACHE[w + 2u]),
        bitcast<f32>(CACHE[w + 3u]),
    );
}

fn cache1_f32(base: u32, i: u32) -> f32 {
    return bitcast<f32>(CACHE[(base >> 2u) + i]);
}

fn cache4_f16(base: u32, i: u32) -> vec4<f32> {
    let w = (base >> 2u) + (i >> 1u);
    return vec4<f32>(unpack2x16float(CACHE[w]), unpack2x16float(CACHE[w + 1u]));
}

fn cache1_f16(base: u32, i: u32) -> f32 {
    return cache_f16(base + 2u * i);
}

fn cache4_q8_0(base: u32, i: u32) -> vec4<f32> {
    let blk = base + (i >> 5u) * 34u;
    let q = bitcast<i32>(cache_u32(blk + 2u + (i & 31u)));
    let v = vec4<f32>(
        f32(extractBits(q, 0u, 8u)),
        f32(extractBits(q, 8u, 8u)),
        f32(extractBits(q, 16u, 8u)),
        f32(extractBits(q, 24u, 8u)),
    );
    return v * cache_f16(blk);
}

fn cache1_q8_0(base: u32, i: u32) -> f32 {
    let blk = base + (i >> 5u) * 34u;
    let q = bitcast<i32>(cache_u32(blk + 2u + (i & 31u)));
    return f32(extractBits(q, 0u, 8u)) * cache_f16(blk);
}

fn cache4_q4_0(base: u32, i: u32) -> vec4<f32> {
    let blk = base + (i >> 5u) * 18u;
    let j = i & 31u;
    let q = (cache_u32(blk + 2u + (j & 15u)) >> select(0u, 4u, j >= 16u)) & 0x0f0f0f0fu;
    let v = vec4<f32>(
        f32(q & 0xffu),
        f32((q >> 8u) & 0xffu),
        f32((q >> 16u) & 0xffu),
        f32(q >> 24u),
    );
    return (v - 8.0) * cache_f16(blk);
}

fn cache1_q4_0(base: u32, i: u32) -> f32 {
    let blk = base + (i >> 5u) * 18u;
    let j = i & 31u;
    let q = (cache_u32(blk + 2u + (j & 15u)) >> select(0u, 4u, j >= 16u)) & 0x0fu;
    return (f32(q) - 8.0) * cache_f16(blk);
}

// The 4-bit types below share q4_0's nibble layout (`cache_nibbles4`: elements i ..
// i + 3 as the bytes of one word). q4_1: f16 d, f16 m, then the nibbles; value
// q * d + m. q5_0: f16 d, u32 qh (bit e is element e's fifth bit), nibbles; value
// (q - 16) * d. q5_1: f16 d, f16 m, u32 qh, nibbles; value q * d + m. iq4_nl: f16
// d, nibbles indexing ggml's `kvalues_iq4nl`; value table[q] * d.

fn cache_nibbles4(qs: u32, j: u32) -> vec4<f32> {
    let q = (cache_u32(qs + (j & 15u)) >> select(0u, 4u, j >= 16u)) & 0x0f0f0f0fu;
    return vec4<f32>(
        f32(q & 0xffu),
        f32((q >> 8u) & 0xffu),
        f32((q >> 16u) & 0xffu),
        f32(q >> 24u),
    );
}

fn cache_nibble1(qs: u32, j: u32) -> u32 {
    return (cache_u32(qs + (j & 15u)) >> select(0u, 4u, j >= 16u)) & 0x0fu;
}

// Fifth bits of elements j .. j + 3, as 0 or 16.
fn cache_high4(qh: u32, j: u32) -> vec4<f32> {
    let h = cache_u32(qh) >> j;
    return vec4<f32>(
        f32(h & 1u),
        f32((h >> 1u) & 1u),
        f32((h >> 2u) & 1u),
        f32((h >> 3u) & 1u),
    ) * 16.0;
}

fn cache4_q4_1(base: u32, i: u32) -> vec4<f32> {
    let blk = base + (i >> 5u) * 20u;
    return cache_nibbles4(blk + 4u, i & 31u) * cache_f16(blk) + cache_f16(blk + 2u);
}

fn cache1_q4_1(base: u32, i: u32) -> f32 {
    let blk = base + (i >> 5u) * 20u;
    return f32(cache_nibble1(blk + 4u, i & 31u)) * cache_f16(blk) + cache_f16(blk + 2u);
}

fn cache4_q5_0(base: u32, i: u32) -> vec4<f32> {
    let blk = base + (i >> 5u) * 22u;
    let j = i & 31u;
    return (cache_nibbles4(blk + 6u, j) + cache_high4(blk + 2u, j) - 16.0) * cache_f16(blk);
}

fn cache1_q5_0(base: u32, i: u32) -> f32 {
    let blk = base + (i >> 5u) * 22u;
    let j = i & 31u;
    let h = f32((cache_u32(blk + 2u) >> j) & 1u) * 16.0;
    return (f32(cache_nibble1(blk + 6u, j)) + h - 16.0) * cache_f16(blk);
}

fn cache4_q5_1(base: u32, i: u32) -> vec4<f32> {
    let blk = base + (i >> 5u) * 24u;
    let j = i & 31u;
    let q = cache_nibbles4(blk + 8u, j) + cache_high4(blk + 4u, j);
    return q * cache_f16(blk) + cache_f16(blk + 2u);
}

fn cache1_q5_1(base: u32, i: u32) -> f32 {
    let blk = base + (i >> 5u) * 24u;
    let j = i & 31u;
    let h = f32((cache_u32(blk + 4u) >> j) & 1u) * 16.0;
    return (f32(cache_nibble1(blk + 8u, j)) + h) * cache_f16(blk) + cache_f16(blk + 2u);
}

fn cache_iq4nl_value(q: u32) -> f32 {
    var table = array<f32, 16>(
        -127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
        1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0,
    );
    return table[q];
}

fn cache4_iq4_nl(base: u32, i: u32) -> vec4<f32> {
    let blk = base + (i >> 5u) * 18u;
    let q = cache_nibbles4(blk + 2u, i & 31u);
    let v = vec4<f32>(
        cache_iq4nl_value(u32(q.x)),
        cache_iq4nl_value(u32(q.y)),
        cache_iq4nl_value(u32(q.z)),
        cache_iq4nl_value(u32(q.w)),
    );
    return v * cache_f16(blk);
}

fn cache1_iq4_nl(base: u32, i: u32) -> f32 {
    let blk = base + (i >> 5u) * 18u;
    return cache_iq4nl_value(cache_nibble1(blk + 2u, i & 31u)) * cache_f16(blk);
}
