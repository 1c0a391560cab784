// Rounds activations the way ggml's CPU backend converts them before a matmul with
// a weight of a given type (the weight type's "vec_dot_type"), so the GPU computes
// the products ggml computes and the logits of both backends agree closely:
//   mode 1 (q4_0, q4_1, q8_0 weights -> Q8_0/Q8_1): per 32 elements,
//          d = amax / 127, q = round_even(x * 127 / amax), x' = q * f16(d);
//   mode 2 (k-quant weights -> Q8_K): per 256 elements, m = the element of largest
//          magnitude (the first), s = -127 / m, x' = min(round_even(x * s), 127) / s;
//   mode 3 (f16 weights -> F16): x' = f16(x);
//   mode 4 (q4_1 weights -> Q8_1): as mode 1, and per block the difference between
//          the block sum ggml stores (f16(d * Σq)) and the one x' implies
//          (f16(d) * Σq) into CORR, which the matmul adds times the weight block's min.
// One workgroup per 256 elements of one token (dispatch (ceil(k / 256), tokens)).

struct RoundParams {
    k: u32,
    mode: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> P: RoundParams;
// [tokens][k / 32]
@group(0) @binding(5) var<storage, read_write> CORR: array<f32>;

var<workgroup> vals: array<f32, 256>;
var<workgroup> qsum: array<f32, 256>;

@compute @workgroup_size(256)
fn act_round(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let i = wid.x * 256u + li;
    let o = wid.y * P.k + i;
    var x = 0.0;
    if (i < P.k) {
        x = X[o];
    }
    vals[li] = x;
    workgroupBarrier();
    var y = x;
    var q = 0.0;
    var d = 0.0;
    if (P.mode == 1u || P.mode == 4u) {
        let g = li & ~31u;
        var amax = 0.0;
        for (var j = 0u; j < 32u; j++) {
            amax = max(amax, abs(vals[g + j]));
        }
        d = amax / 127.0;
        if (amax > 0.0) {
            q = round(x * (127.0 / amax));
        }
        y = q * f16_round(d);
    } else if (P.mode == 2u) {
        var amax = 0.0;
        var m = 0.0;
        for (var j = 0u; j < 256u; j++) {
            let v = vals[j];
            if (abs(v) > amax) {
                amax = abs(v);
                m = v;
            }
        }
        if (amax > 0.0) {
            let iscale = -127.0 / m;
            y = min(round(iscale * x), 127.0) * (1.0 / iscale);
        } else {
            y = 0.0;
        }
    } else if (P.mode == 3u) {
        y = unpack2x16float(pack2x16float(vec2<f32>(x, 0.0))).x;
    }
    if (i < P.k) {
        Y[o] = y;
    }
    if (P.mode == 4u) {
        qsum[li] = q;
        workgroupBarrier();
        if ((li & 31u) == 0u && i < P.k) {
            var sum = 0.0;
            for (var j = 0u; j < 32u; j++) {
                sum += qsum[li + j];
            }
            CORR[wid.y * (P.k / 32u) + i / 32u] = f16_round(d * sum) - f16_round(d) * sum;
        }
    }
}

fn f16_round(v: f32) -> f32 {
    return unpack2x16float(pack2x16float(vec2<f32>(v, 0.0))).x;
}
