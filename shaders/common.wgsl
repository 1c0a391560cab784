// Shared by every kernel: what changes from one forward pass to the next. Written
// once per command encoder, so the per-op bind groups can be built once up front.
struct Step {
    // Tokens in this pass.
    n_tokens: u32,
    // Cache row (= position) of the pass's first token.
    pos0: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(4) var<uniform> S: Step;
