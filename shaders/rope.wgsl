// Rotary embeddings: NORM mode (llama) rotates adjacent pairs (x[2i], x[2i+1]) of
// each head by the angle of (position, i); NEOX mode (qwen2, qwen3) the pairs
// (x[i], x[i + head_dim/2]). The host computes the cos/sin table for
// the pass's positions exactly as ggml does (f32 angle built by repeated
// multiplication, libm cos/sin), so both backends rotate by the same numbers; GPU
// transcendentals on large angles are far less exact. In place on
// [tokens][heads][head_dim].

struct RopeParams {
    n_heads: u32,
    head_dim: u32,
    // 1: NEOX pairs, 0: adjacent pairs
    neox: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> T: array<f32>;
// [tokens][head_dim / 2] of (cos, sin)
@group(0) @binding(1) var<storage, read> TABLE: array<vec2<f32>>;
@group(0) @binding(3) var<uniform> P: RopeParams;

@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half_dim = P.head_dim / 2u;
    let idx = gid.x;
    if (idx >= P.n_heads * half_dim) {
        return;
    }
    let t = gid.y;
    let i = idx % half_dim;
    let h = idx / half_dim;
    let cs = TABLE[t * half_dim + i];
    let head = t * P.n_heads * P.head_dim + h * P.head_dim;
    var o0 = head + 2u * i;
    var o1 = o0 + 1u;
    if (P.neox != 0u) {
        o0 = head + i;
        o1 = head + i + half_dim;
    }
    let x0 = T[o0];
    let x1 = T[o1];
    T[o0] = x0 * cs.x - x1 * cs.y;
    T[o1] = x0 * cs.y + x1 * cs.x;
}
