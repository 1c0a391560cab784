// Shared by every kernel: what changes from one forward pass to the next. Written
// once per command encoder, so the per-op bind groups can be built once up front.
struct Step {
    // Tokens in this pass.
    n_tokens: u32,
    // Added to every row of ROWS where a store writes (the context shift's
    // destination; 0 in a forward pass).
    pos0: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(4) var<uniform> S: Step;

// Per token of the pass: (cache row it is stored at, first cache row it attends
// to); it attends to rows first..=row. One sequence: (n_past + t, 0); packed
// texts: each text's first row; several sequences: each sequence's first cell.
// Its position is row - first.
@group(0) @binding(7) var<storage, read> ROWS: array<vec2<u32>>;
