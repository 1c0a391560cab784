// y = x / sqrt(mean(x²) + eps) * w, one workgroup per token (ggml's rms_norm then mul).
// Dispatched as (1, tokens).

struct NormParams {
    n: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read> NW: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> P: NormParams;

var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(256)
fn rms_norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let base = wid.y * P.n;
    var s = 0.0;
    for (var i = li; i < P.n; i += 256u) {
        let v = X[base + i];
        s += v * v;
    }
    part[li] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (li < w) {
            part[li] += part[li + w];
        }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(part[0] / f32(P.n) + P.eps);
    for (var i = li; i < P.n; i += 256u) {
        Y[base + i] = X[base + i] * scale * NW[i];
    }
}
