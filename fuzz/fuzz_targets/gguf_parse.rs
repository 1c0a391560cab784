//! Feeds arbitrary bytes to the GGUF header parser. Besides "never panics", an
//! accepted header must keep the reader's promises: every tensor lies inside
//! the input, is aligned and overlaps no other.
#![no_main]

use kvsharer::gguf::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_header(data) else {
        return;
    };
    assert!(header.alignment.is_power_of_two());
    assert!(header.data_offset <= data.len() as u64);
    let data_len = data.len() as u64 - header.data_offset;
    let mut spans: Vec<(u64, u64)> = header
        .tensors
        .iter()
        .map(|t| {
            assert_eq!(t.offset % header.alignment, 0, "{}", t.name);
            let expected = t.ggml_type.row_bytes(t.dims[0]).expect("whole blocks")
                * t.dims[1..].iter().product::<u64>();
            assert_eq!(t.n_bytes, expected, "{}", t.name);
            let end = t.offset.checked_add(t.n_bytes).expect("end overflows");
            assert!(end <= data_len, "{} past the end", t.name);
            (t.offset, end)
        })
        .collect();
    spans.sort_unstable();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "tensors overlap"
    );
    for (_, value) in &header.metadata {
        let _ = (
            value.as_u64(),
            value.as_f32(),
            value.as_str(),
            value.type_name(),
        );
        if let Some(array) = value.as_array() {
            let _ = (array.len(), array.to_u32_vec(), array.to_f32_vec());
        }
    }
});
