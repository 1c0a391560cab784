//! What each weight tensor of a Llama model is for (`Role`), and its name in a GGUF
//! file: the one place kvsharer spells tensor names.

/// One decoder layer's tensors, in the order a layer reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerRole {
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnDown,
    /// Biases of the Q, K, V projections (`qwen2`; optional on `llama`).
    AttnQBias,
    AttnKBias,
    AttnVBias,
    /// Per-head RMS norm weights of queries and keys (`qwen3`).
    AttnQNorm,
    AttnKNorm,
    /// `attn_q` with a fitted key adapter folded in (`search::adapter`): read in
    /// place of `AttnQ` while the layer reads keys from the source it was fitted for.
    AttnQAdapted,
    /// `attn_output` with a fitted value adapter folded in, read in place of
    /// `AttnOutput` while the layer reads values from the source it was fitted for.
    AttnOutputAdapted,
}

impl LayerRole {
    pub const ALL: [LayerRole; 9] = [
        LayerRole::AttnNorm,
        LayerRole::AttnQ,
        LayerRole::AttnK,
        LayerRole::AttnV,
        LayerRole::AttnOutput,
        LayerRole::FfnNorm,
        LayerRole::FfnGate,
        LayerRole::FfnUp,
        LayerRole::FfnDown,
    ];

    /// Tensors some variants have and others lack (`LayerWeights::get`).
    pub const OPTIONAL: [LayerRole; 7] = [
        LayerRole::AttnQBias,
        LayerRole::AttnKBias,
        LayerRole::AttnVBias,
        LayerRole::AttnQNorm,
        LayerRole::AttnKNorm,
        LayerRole::AttnQAdapted,
        LayerRole::AttnOutputAdapted,
    ];

    /// What computes keys or values (projections, their biases, the key norm),
    /// which a layer that reads another layer's cache never runs.
    pub fn is_kv_projection(self) -> bool {
        matches!(
            self,
            LayerRole::AttnK
                | LayerRole::AttnV
                | LayerRole::AttnKBias
                | LayerRole::AttnVBias
                | LayerRole::AttnKNorm
        )
    }
}

/// What a weight tensor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    TokenEmbd,
    OutputNorm,
    /// The output projection; absent from files whose embeddings are tied.
    Output,
    /// RoPE frequency factors (Llama 3.x long-context scaling); optional.
    RopeFreqs,
    Layer(usize, LayerRole),
}

impl Role {
    /// The tensor's name in a GGUF file: the one place kvsharer spells them.
    pub fn tensor_name(self) -> String {
        match self {
            Role::TokenEmbd => "token_embd.weight".into(),
            Role::OutputNorm => "output_norm.weight".into(),
            Role::Output => "output.weight".into(),
            Role::RopeFreqs => "rope_freqs.weight".into(),
            Role::Layer(il, r) => {
                let (stem, kind) = match r {
                    LayerRole::AttnNorm => ("attn_norm", "weight"),
                    LayerRole::AttnQ => ("attn_q", "weight"),
                    LayerRole::AttnK => ("attn_k", "weight"),
                    LayerRole::AttnV => ("attn_v", "weight"),
                    LayerRole::AttnOutput => ("attn_output", "weight"),
                    LayerRole::FfnNorm => ("ffn_norm", "weight"),
                    LayerRole::FfnGate => ("ffn_gate", "weight"),
                    LayerRole::FfnUp => ("ffn_up", "weight"),
                    LayerRole::FfnDown => ("ffn_down", "weight"),
                    LayerRole::AttnQBias => ("attn_q", "bias"),
                    LayerRole::AttnKBias => ("attn_k", "bias"),
                    LayerRole::AttnVBias => ("attn_v", "bias"),
                    LayerRole::AttnQNorm => ("attn_q_norm", "weight"),
                    LayerRole::AttnKNorm => ("attn_k_norm", "weight"),
                    LayerRole::AttnQAdapted => ("attn_q", "kvsharer.weight"),
                    LayerRole::AttnOutputAdapted => ("attn_output", "kvsharer.weight"),
                };
                format!("blk.{il}.{stem}.{kind}")
            }
        }
    }

    /// True for matrices a matmul (or the embedding row lookup) reads, in any of
    /// `MATMUL_TYPES`; false for the f32 vectors (norm weights, RoPE factors).
    pub fn is_matmul(self) -> bool {
        !matches!(
            self,
            Role::OutputNorm
                | Role::RopeFreqs
                | Role::Layer(
                    _,
                    LayerRole::AttnNorm
                        | LayerRole::FfnNorm
                        | LayerRole::AttnQBias
                        | LayerRole::AttnKBias
                        | LayerRole::AttnVBias
                        | LayerRole::AttnQNorm
                        | LayerRole::AttnKNorm
                )
        )
    }
}
