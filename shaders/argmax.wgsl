// Index of the largest of X[0..n] (the lowest index among equal maxima), into R[0].

struct ArgmaxParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> R: array<u32>;
@group(0) @binding(3) var<uniform> P: ArgmaxParams;

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

@compute @workgroup_size(256)
fn argmax(@builtin(local_invocation_index) li: u32) {
    var v = -3.4028235e38;
    var idx = 0xffffffffu;
    for (var i = li; i < P.n; i += 256u) {
        let x = X[i];
        // NaN never wins (x == x is false for NaN), as in sample::argmax.
        if (x == x && (x > v || idx == 0xffffffffu)) {
            v = x;
            idx = i;
        }
    }
    best_v[li] = v;
    best_i[li] = idx;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (li < w) {
            let ov = best_v[li + w];
            let oi = best_i[li + w];
            if (oi != 0xffffffffu && (ov > best_v[li] || (ov == best_v[li] && oi < best_i[li]) || best_i[li] == 0xffffffffu)) {
                best_v[li] = ov;
                best_i[li] = oi;
            }
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        R[0] = best_i[0];
    }
}
