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

    /// The K/V projections, which a layer that reads another layer's cache never runs.
    pub fn is_kv_projection(self) -> bool {
        matches!(self, LayerRole::AttnK | LayerRole::AttnV)
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
        let layer = |il: usize, stem: &str| format!("blk.{il}.{stem}.weight");
        match self {
            Role::TokenEmbd => "token_embd.weight".into(),
            Role::OutputNorm => "output_norm.weight".into(),
            Role::Output => "output.weight".into(),
            Role::RopeFreqs => "rope_freqs.weight".into(),
            Role::Layer(il, r) => layer(
                il,
                match r {
                    LayerRole::AttnNorm => "attn_norm",
                    LayerRole::AttnQ => "attn_q",
                    LayerRole::AttnK => "attn_k",
                    LayerRole::AttnV => "attn_v",
                    LayerRole::AttnOutput => "attn_output",
                    LayerRole::FfnNorm => "ffn_norm",
                    LayerRole::FfnGate => "ffn_gate",
                    LayerRole::FfnUp => "ffn_up",
                    LayerRole::FfnDown => "ffn_down",
                },
            ),
        }
    }

    /// True for matrices a matmul (or the embedding row lookup) reads, in any of
    /// `MATMUL_TYPES`; false for the f32 vectors (norm weights, RoPE factors).
    pub fn is_matmul(self) -> bool {
        !matches!(
            self,
            Role::OutputNorm
                | Role::RopeFreqs
                | Role::Layer(_, LayerRole::AttnNorm | LayerRole::FfnNorm)
        )
    }
}
