//! Byte-level tokenizer: one token per UTF-8 byte, vocabulary of 256.

/// Tokens a byte-level vocabulary needs.
pub const BYTE_VOCAB: usize = 256;

pub fn encode_bytes(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Decodes byte tokens; ids above 255 (possible when the model's vocabulary is padded) and
/// invalid UTF-8 show as U+FFFD rather than failing.
pub fn decode_bytes(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens
        .iter()
        .map(|&t| u8::try_from(t).unwrap_or(0xFF))
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_utf8() {
        let s = "12+30=42\nπ ≈ 3.14 ✓";
        assert_eq!(decode_bytes(&encode_bytes(s)), s);
        assert_eq!(encode_bytes("a\n"), vec![97, 10]);
    }

    #[test]
    fn out_of_range_ids_decode_as_replacement() {
        assert_eq!(decode_bytes(&[104, 105, 300]), "hi\u{FFFD}");
    }
}
