// What the Llama variants add to the Q/K/V projections, in place on
// [tokens][heads][head_dim]: qwen2's biases (add_bias) and qwen3's per-head RMS
// norm of queries and keys before RoPE (head_norm; ggml's rms_norm over each head's
// head_dim values, then mul by the norm weight).

struct ExtraParams {
    // add_bias: values per token; head_norm: head_dim
    n: u32,
    eps: f32,
    // head_norm: heads per token
    n_heads: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read_write> T: array<f32>;
@group(0) @binding(1) var<storage, read> W: array<f32>;
@group(0) @binding(3) var<uniform> P: ExtraParams;

// Dispatched as (ceil(n / 64), tokens).
@compute @workgroup_size(64)
fn add_bias(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= P.n) {
        return;
    }
    let o = gid.y * P.n + gid.x;
    T[o] = T[o] + W[gid.x];
}

var<workgroup> part: array<f32, 64>;

// Dispatched as (heads, tokens): one workgroup per head of a token.
@compute @workgroup_size(64)
fn head_norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let base = (wid.y * P.n_heads + wid.x) * P.n;
    var s = 0.0;
    for (var i = li; i < P.n; i += 64u) {
        let v = T[base + i];
        s += v * v;
    }
    part[li] = s;
    workgroupBarrier();
    for (var w = 32u; w > 0u; w >>= 1u) {
        if (li < w) {
            part[li] += part[li + w];
        }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(part[0] / f32(P.n) + P.eps);
    workgroupBarrier();
    for (var i = li; i < P.n; i += 64u) {
        T[base + i] = T[base + i] * scale * W[i];
    }
}
