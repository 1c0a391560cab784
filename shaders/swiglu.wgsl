// gate = silu(gate) * up, in place, [tokens][n].

struct SwigluParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> G: array<f32>;
@group(0) @binding(1) var<storage, read> U: array<f32>;
@group(0) @binding(3) var<uniform> P: SwigluParams;

@compute @workgroup_size(64)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= P.n) {
        return;
    }
    let o = gid.y * P.n + gid.x;
    let g = G[o];
    G[o] = g / (1.0 + exp(-g)) * U[o];
}
