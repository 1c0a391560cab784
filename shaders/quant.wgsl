// Dequantization of GGUF weight blocks read in place from the tensor's raw bytes
// (`W`, bound as u32 words). Each `load4_*` returns the four consecutive elements
// k..k+3 (k a multiple of 4) of the row whose first byte is `base`. Block layouts
// are ggml's (ggml-common.h); the formulas follow its `dequantize_row_*`.

// Four bytes starting at any byte offset (blocks of 18, 34 or 210 bytes leave rows
// and fields unaligned). Weight buffers carry 4 bytes of padding for the last word.
fn rd_u32(off: u32) -> u32 {
    let w = off >> 2u;
    let s = (off & 3u) * 8u;
    if (s == 0u) {
        return W[w];
    }
    return (W[w] >> s) | (W[w + 1u] << (32u - s));
}

fn rd_u8(off: u32) -> u32 {
    return (W[off >> 2u] >> ((off & 3u) * 8u)) & 0xffu;
}

// An f16 at an even byte offset (every ggml block size is even).
fn rd_f16(off: u32) -> f32 {
    let v = unpack2x16float(W[off >> 2u]);
    return select(v.x, v.y, (off & 2u) != 0u);
}

fn bytes4(q: u32) -> vec4<f32> {
    return vec4<f32>(f32(q & 0xffu), f32((q >> 8u) & 0xffu), f32((q >> 16u) & 0xffu), f32(q >> 24u));
}

fn sbytes4(q: u32) -> vec4<f32> {
    let i = bitcast<i32>(q);
    return vec4<f32>(
        f32(extractBits(i, 0u, 8u)),
        f32(extractBits(i, 8u, 8u)),
        f32(extractBits(i, 16u, 8u)),
        f32(extractBits(i, 24u, 8u)),
    );
}

fn load4_f32(base: u32, k: u32) -> vec4<f32> {
    let w = (base >> 2u) + k;
    return vec4<f32>(bitcast<f32>(W[w]), bitcast<f32>(W[w + 1u]), bitcast<f32>(W[w + 2u]), bitcast<f32>(W[w + 3u]));
}

fn load4_f16(base: u32, k: u32) -> vec4<f32> {
    let w = (base >> 2u) + (k >> 1u);
    return vec4<f32>(unpack2x16float(W[w]), unpack2x16float(W[w + 1u]));
}

// block_q4_0 { f16 d; u8 qs[16]; }: element j < 16 is the low nibble of qs[j],
// element j + 16 the high nibble; value (q - 8) * d.
fn load4_q4_0(base: u32, k: u32) -> vec4<f32> {
    let blk = base + (k >> 5u) * 18u;
    let j = k & 31u;
    let q = (rd_u32(blk + 2u + (j & 15u)) >> select(0u, 4u, j >= 16u)) & 0x0f0f0f0fu;
    return (bytes4(q) - 8.0) * rd_f16(blk);
}

// block_q4_1 { f16 d; f16 m; u8 qs[16]; }: value q * d + m.
fn load4_q4_1(base: u32, k: u32) -> vec4<f32> {
    let blk = base + (k >> 5u) * 20u;
    let j = k & 31u;
    let q = (rd_u32(blk + 4u + (j & 15u)) >> select(0u, 4u, j >= 16u)) & 0x0f0f0f0fu;
    return bytes4(q) * rd_f16(blk) + rd_f16(blk + 2u);
}

// The min m of the q4_1 block holding element k.
fn block_min_q4_1(base: u32, k: u32) -> f32 {
    return rd_f16(base + (k >> 5u) * 20u + 2u);
}

// block_q8_0 { f16 d; i8 qs[32]; }: value q * d.
fn load4_q8_0(base: u32, k: u32) -> vec4<f32> {
    let blk = base + (k >> 5u) * 34u;
    return sbytes4(rd_u32(blk + 2u + (k & 31u))) * rd_f16(blk);
}

// The 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block, packed in 12
// bytes at `sc` (ggml's get_scale_min_k4).
fn scale_min_k4(sc: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(rd_u8(sc + j) & 63u), f32(rd_u8(sc + j + 4u) & 63u));
    }
    let d = (rd_u8(sc + j + 4u) & 0xfu) | ((rd_u8(sc + j - 4u) >> 6u) << 4u);
    let m = (rd_u8(sc + j + 4u) >> 4u) | ((rd_u8(sc + j) >> 6u) << 4u);
    return vec2<f32>(f32(d), f32(m));
}

// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; } over 256 elements: 64-element
// group g takes its low nibbles (first 32) and high nibbles (next 32) from qs[32g..32g+32].
fn load4_q4_k(base: u32, k: u32) -> vec4<f32> {
    let blk = base + (k >> 8u) * 144u;
    let j = k & 255u;
    let g = j >> 6u;
    let hi = (j & 32u) != 0u;
    let l = j & 31u;
    let sm = scale_min_k4(blk + 4u, 2u * g + select(0u, 1u, hi));
    let q = (rd_u32(blk + 16u + 32u * g + l) >> select(0u, 4u, hi)) & 0x0f0f0f0fu;
    return bytes4(q) * (rd_f16(blk) * sm.x) - rd_f16(blk + 2u) * sm.y;
}

// block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }: as Q4_K plus a
// fifth bit, bit (2g or 2g+1) of qh[l].
fn load4_q5_k(base: u32, k: u32) -> vec4<f32> {
    let blk = base + (k >> 8u) * 176u;
    let j = k & 255u;
    let g = j >> 6u;
    let hi = (j & 32u) != 0u;
    let l = j & 31u;
    let sub = 2u * g + select(0u, 1u, hi);
    let sm = scale_min_k4(blk + 4u, sub);
    let ql = (rd_u32(blk + 48u + 32u * g + l) >> select(0u, 4u, hi)) & 0x0f0f0f0fu;
    let qh = (rd_u32(blk + 16u + l) >> sub) & 0x01010101u;
    return bytes4(ql | (qh << 4u)) * (rd_f16(blk) * sm.x) - rd_f16(blk + 2u) * sm.y;
}

// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }: per 128-element half n,
// quarter c takes 4 bits from ql (low or high nibble) and 2 from qh, minus 32,
// scaled by d * scales[8n + l/16 + 2c].
fn load4_q6_k(base: u32, k: u32) -> vec4<f32> {
    let blk = base + (k >> 8u) * 210u;
    let j = k & 255u;
    let n = j >> 7u;
    let c = (j & 127u) >> 5u;
    let l = j & 31u;
    let ql = (rd_u32(blk + 64u * n + l + 32u * (c & 1u)) >> (4u * (c >> 1u))) & 0x0f0f0f0fu;
    let qh = (rd_u32(blk + 128u + 32u * n + l) >> (2u * c)) & 0x03030303u;
    let sc = f32(extractBits(bitcast<i32>(rd_u8(blk + 192u + 8u * n + (l >> 4u) + 2u * c)), 0u, 8u));
    return (bytes4(ql | (qh << 4u)) - 32.0) * (rd_f16(blk + 208u) * sc);
}
