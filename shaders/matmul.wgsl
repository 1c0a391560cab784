// Y = W · X for a GGUF weight W ([n rows][k columns], read in its own block format
// through `load4`, which the host defines for the tensor's type) and f32
// activations X ([tokens][k]). `matvec` serves decode (one token per row of
// workgroups); `matmul_tiled` serves prefill (64 rows x 32 tokens per workgroup,
// both operands staged through workgroup memory). `get_rows` is the embedding lookup.

struct MatmulParams {
    // Elements per weight row (a multiple of 32).
    k: u32,
    // Weight rows: outputs per token.
    n: u32,
    row_bytes: u32,
    // 1: Y += W·X (the residual add, fused).
    accumulate: u32,
    // 1: only the pass's last token, written to row 0 of Y (the logits of generation).
    last_only: u32,
    // 1: add Σ_blocks block_min(weight) * CORR[token][block] (ggml's Q8_1 block sums,
    // see act_round.wgsl).
    corr: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> P: MatmulParams;
@group(0) @binding(5) var<storage, read> TOKENS: array<u32>;
@group(0) @binding(6) var<storage, read> CORR: array<f32>;

fn store(o: u32, v: f32) {
    if (P.accumulate != 0u) {
        Y[o] = Y[o] + v;
    } else {
        Y[o] = v;
    }
}

const MV_WG: u32 = 64u;
var<workgroup> mv_part: array<f32, MV_WG>;

@compute @workgroup_size(64)
fn matvec(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= P.n) {
        return;
    }
    let tok = select(0u, S.n_tokens - 1u, P.last_only != 0u);
    let base = row * P.row_bytes;
    let xb = tok * P.k;
    var acc = 0.0;
    for (var k = li * 4u; k < P.k; k += MV_WG * 4u) {
        let x = vec4<f32>(X[xb + k], X[xb + k + 1u], X[xb + k + 2u], X[xb + k + 3u]);
        acc += dot(load4(base, k), x);
        if (P.corr != 0u && (k & 31u) == 0u) {
            acc += block_min(base, k) * CORR[tok * (P.k / 32u) + k / 32u];
        }
    }
    mv_part[li] = acc;
    workgroupBarrier();
    for (var s = MV_WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            mv_part[li] += mv_part[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        store(row, mv_part[0]);
    }
}

const TN: u32 = 64u;
const TM: u32 = 32u;
const TK: u32 = 32u;
// Stored k-major ([TK][TN] and [TK][TM]) so the inner loop reads rows contiguously.
var<workgroup> w_tile: array<f32, 2048>;
var<workgroup> x_tile: array<f32, 1024>;

@compute @workgroup_size(256)
fn matmul_tiled(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let n0 = wid.x * TN;
    let m0 = wid.y * TM;
    let m_count = S.n_tokens;
    // Each invocation owns 4 weight rows x 2 tokens of the tile.
    let tx = li % 16u;
    let ty = li / 16u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < P.k; k0 += TK) {
        for (var i = 0u; i < 2u; i++) {
            let idx = li + i * 256u;
            let r = idx / 8u;
            let kk = (idx % 8u) * 4u;
            var w = vec4<f32>(0.0);
            if (n0 + r < P.n) {
                w = load4((n0 + r) * P.row_bytes, k0 + kk);
            }
            w_tile[kk * TN + r] = w.x;
            w_tile[(kk + 1u) * TN + r] = w.y;
            w_tile[(kk + 2u) * TN + r] = w.z;
            w_tile[(kk + 3u) * TN + r] = w.w;
        }
        {
            let m = li / 8u;
            let kk = (li % 8u) * 4u;
            var x = vec4<f32>(0.0);
            if (m0 + m < m_count) {
                let b = (m0 + m) * P.k + k0 + kk;
                x = vec4<f32>(X[b], X[b + 1u], X[b + 2u], X[b + 3u]);
            }
            x_tile[kk * TM + m] = x.x;
            x_tile[(kk + 1u) * TM + m] = x.y;
            x_tile[(kk + 2u) * TM + m] = x.z;
            x_tile[(kk + 3u) * TM + m] = x.w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let wb = kk * TN + tx * 4u;
            let w = vec4<f32>(w_tile[wb], w_tile[wb + 1u], w_tile[wb + 2u], w_tile[wb + 3u]);
            acc0 += w * x_tile[kk * TM + ty * 2u];
            acc1 += w * x_tile[kk * TM + ty * 2u + 1u];
        }
        if (P.corr != 0u) {
            let nb = P.k / 32u;
            let b = k0 / 32u;
            let m_a = min(m0 + ty * 2u, m_count - 1u);
            let m_b = min(m0 + ty * 2u + 1u, m_count - 1u);
            let c_a = CORR[m_a * nb + b];
            let c_b = CORR[m_b * nb + b];
            var mins = vec4<f32>(0.0);
            for (var r = 0u; r < 4u; r++) {
                let n = min(n0 + tx * 4u + r, P.n - 1u);
                mins[r] = block_min(n * P.row_bytes, k0);
            }
            acc0 += mins * c_a;
            acc1 += mins * c_b;
        }
        workgroupBarrier();
    }
    for (var c = 0u; c < 2u; c++) {
        let m = m0 + ty * 2u + c;
        if (m >= m_count) {
            continue;
        }
        let acc = select(acc0, acc1, c == 1u);
        for (var r = 0u; r < 4u; r++) {
            let n = n0 + tx * 4u + r;
            if (n < P.n) {
                store(m * P.n + n, acc[r]);
            }
        }
    }
}

// Row TOKENS[t] of the table into row t of Y, 4 elements per invocation.
@compute @workgroup_size(64)
fn get_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let t = wid.y;
    let k = (wid.x * 64u + li) * 4u;
    if (k >= P.k) {
        return;
    }
    let v = load4(TOKENS[t] * P.row_bytes, k);
    let o = t * P.k + k;
    Y[o] = v.x;
    Y[o + 1u] = v.y;
    Y[o + 2u] = v.z;
    Y[o + 3u] = v.w;
}
