// Writes this pass's keys and values (f32, [tokens][n_embd_kv]) into an owning
// layer's cache slot as f16 ([n_ctx][n_embd_kv], two halves per u32), at the rows
// of the tokens' positions. Shared layers never run this.

struct StoreParams {
    n_embd_kv: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> K: array<f32>;
@group(0) @binding(1) var<storage, read> V: array<f32>;
@group(0) @binding(2) var<storage, read_write> KC: array<u32>;
@group(0) @binding(5) var<storage, read_write> VC: array<u32>;
@group(0) @binding(3) var<uniform> P: StoreParams;

@compute @workgroup_size(64)
fn kv_store(@builtin(global_invocation_id) gid: vec3<u32>) {
    let pairs = P.n_embd_kv / 2u;
    let p = gid.x;
    if (p >= pairs) {
        return;
    }
    let t = gid.y;
    let src = t * P.n_embd_kv + 2u * p;
    let dst = (S.pos0 + t) * pairs + p;
    KC[dst] = pack2x16float(vec2<f32>(K[src], K[src + 1u]));
    VC[dst] = pack2x16float(vec2<f32>(V[src], V[src + 1u]));
}
