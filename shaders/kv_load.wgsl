// Reads cache rows S.pos0 .. S.pos0 + S.n_tokens of a slot back as f32
// ([rows][n_embd_kv], from OUT[P.out_base]): for the context shift (rows moved and
// keys re-rotated go through f32, then `kv_store` again) and `read_kv`. The module
// prepends `kv_cache.wgsl` for KC with the `kc` prefix and `kc4` for the slot's type.

struct LoadParams {
    n_embd_kv: u32,
    row_bytes: u32,
    out_base: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read> KC: array<u32>;
@group(0) @binding(2) var<storage, read_write> OUT: array<f32>;
@group(0) @binding(3) var<uniform> P: LoadParams;

@compute @workgroup_size(64)
fn kv_load(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x * 4u;
    if (i >= P.n_embd_kv) {
        return;
    }
    let t = gid.y;
    let v = kc4((S.pos0 + t) * P.row_bytes, i);
    let o = P.out_base + t * P.n_embd_kv + i;
    OUT[o] = v.x;
    OUT[o + 1u] = v.y;
    OUT[o + 2u] = v.z;
    OUT[o + 3u] = v.w;
}
