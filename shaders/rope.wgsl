// Rotary embeddings, llama NORM mode: adjacent pairs (x[2i], x[2i+1]) of each head
// rotate by pos * base^(-2i/head_dim) (divided by rope_freqs[i] when the model has
// them, times the linear scaling factor). In place on [tokens][heads][head_dim].

struct RopeParams {
    n_heads: u32,
    head_dim: u32,
    has_factors: u32,
    _pad0: u32,
    freq_base: f32,
    freq_scale: f32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> T: array<f32>;
@group(0) @binding(1) var<storage, read> FF: array<f32>;
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
    // ggml builds theta by repeated multiplication; doing the same keeps the angles
    // bit-identical to the CPU path for the same f32 inputs.
    let theta_scale = pow(P.freq_base, -2.0 / f32(P.head_dim));
    var theta = f32(S.pos0 + t);
    for (var j = 0u; j < i; j++) {
        theta *= theta_scale;
    }
    if (P.has_factors != 0u) {
        theta /= FF[i];
    }
    theta *= P.freq_scale;
    let c = cos(theta);
    let s = sin(theta);
    let o = t * P.n_heads * P.head_dim + h * P.head_dim + 2u * i;
    let x0 = T[o];
    let x1 = T[o + 1u];
    T[o] = x0 * c - x1 * s;
    T[o + 1u] = x0 * s + x1 * c;
}
