//! Tokenizers: text to token ids and back. `bytes` is one token per UTF-8 byte (vocabulary 256);
//! `gpt2` is GPT-2's byte-level BPE (r50k_base, 50,257 tokens), whose vocabulary tiktoken-rs
//! carries inside the binary, so it works offline.
//!
//! Long texts are cut into chunks that tokenize independently (see [`safe_cuts`]), which is how
//! `tokenize` uses every core on one large file while giving the same ids as a single pass.

use anyhow::Result;
use tiktoken_rs::CoreBPE;

use crate::config::TokenizerKind;

/// Tokens a byte-level vocabulary needs (the config owns the sizes: the dependency runs from
/// `data` to `config` only).
pub const BYTE_VOCAB: usize = TokenizerKind::Bytes.vocab_size();
/// GPT-2's vocabulary: 50,000 merges, 256 bytes and `<|endoftext|>`.
pub const GPT2_VOCAB: usize = TokenizerKind::Gpt2.vocab_size();
/// GPT-2's `<|endoftext|>`.
pub const GPT2_EOT: u32 = 50_256;
/// End-of-text of the byte tokenizer: byte 0, which text files practically never contain.
pub const BYTES_EOT: u32 = 0;

/// A tokenizer a config or a command names.
#[derive(Clone, Copy)]
pub enum Tokenizer {
    Bytes,
    Gpt2(&'static CoreBPE),
}

impl Tokenizer {
    pub fn new(kind: TokenizerKind) -> Tokenizer {
        match kind {
            TokenizerKind::Bytes => Tokenizer::Bytes,
            TokenizerKind::Gpt2 => Tokenizer::Gpt2(tiktoken_rs::r50k_base_singleton()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Bytes => "bytes",
            Tokenizer::Gpt2(_) => "gpt2",
        }
    }

    /// Ids this tokenizer can produce are `0..vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => BYTE_VOCAB,
            Tokenizer::Gpt2(_) => GPT2_VOCAB,
        }
    }

    /// The token that separates documents.
    pub fn eot(&self) -> u32 {
        match self {
            Tokenizer::Bytes => BYTES_EOT,
            Tokenizer::Gpt2(_) => GPT2_EOT,
        }
    }

    /// Tokens of `text`. Special-token spellings such as `<|endoftext|>` in the text are ordinary
    /// text here: a corpus cannot end its documents by writing them.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Bytes => text.bytes().map(u32::from).collect(),
            Tokenizer::Gpt2(bpe) => bpe.encode_ordinary(text),
        }
    }

    /// Text of `tokens`. Ids outside the vocabulary (possible from a padded embedding table) and
    /// byte sequences that are not UTF-8 show as U+FFFD rather than failing; end-of-text shows as
    /// nothing.
    pub fn decode(&self, tokens: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(tokens.len() * 4);
        for &t in tokens {
            if t == self.eot() {
                continue;
            }
            match self.token_bytes(t) {
                Some(b) => bytes.extend_from_slice(&b),
                None => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes one token stands for; `None` outside the vocabulary.
    pub fn token_bytes(&self, token: u32) -> Option<Vec<u8>> {
        match self {
            Tokenizer::Bytes => u8::try_from(token).ok().map(|b| vec![b]),
            Tokenizer::Gpt2(bpe) => bpe.decode_bytes(&[token]).ok(),
        }
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a tokenizer name as the command line spells it.
pub fn parse_tokenizer(name: &str) -> Result<TokenizerKind, String> {
    match name {
        "bytes" => Ok(TokenizerKind::Bytes),
        "gpt2" => Ok(TokenizerKind::Gpt2),
        other => Err(format!("unknown tokenizer `{other}` (bytes or gpt2)")),
    }
}

/// Byte offsets in `text`, at least `min_chunk` apart, where it can be cut without changing its
/// tokens: just before a single whitespace character that has non-whitespace on both sides.
///
/// Why this is safe for GPT-2's pre-tokenizer (`'s|'t|...| ?\p{L}+| ?\p{N}+|
/// ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`): no piece that holds a non-whitespace character extends
/// past it into a following whitespace character, so a piece ends right before the cut; the
/// lone whitespace character then starts the next piece the same way with or without what came
/// before (the pattern only looks ahead), and with a non-whitespace character after it no
/// whitespace run spans the cut. BPE merges never cross pieces. Byte tokens are trivially safe.
pub fn safe_cuts(text: &str, min_chunk: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut last = 0;
    let mut chars = text.char_indices().peekable();
    let mut prev: Option<char> = None;
    while let Some((pos, c)) = chars.next() {
        let next = chars.peek().map(|&(_, n)| n);
        if pos - last >= min_chunk
            && c.is_whitespace()
            && prev.is_some_and(|p| !p.is_whitespace())
            && next.is_some_and(|n| !n.is_whitespace())
        {
            cuts.push(pos);
            last = pos;
        }
        prev = Some(c);
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2() -> Tokenizer {
        Tokenizer::new(TokenizerKind::Gpt2)
    }

    #[test]
    fn bytes_round_trip_utf8() {
        let t = Tokenizer::new(TokenizerKind::Bytes);
        let s = "12+30=42\nπ ≈ 3.14 ✓";
        assert_eq!(t.decode(&t.encode(s)), s);
        assert_eq!(t.encode("a\n"), vec![97, 10]);
    }

    #[test]
    fn out_of_range_ids_decode_as_replacement() {
        let t = Tokenizer::new(TokenizerKind::Bytes);
        assert_eq!(t.decode(&[104, 105, 300]), "hi\u{FFFD}");
        assert_eq!(gpt2().decode(&[15496, 50300]), "Hello\u{FFFD}");
    }

    /// Ids from OpenAI's GPT-2 tokenizer (the `gpt2` encoding of tiktoken, and Hugging Face's
    /// GPT2TokenizerFast, give the same).
    #[test]
    fn gpt2_gives_the_known_ids() {
        let t = gpt2();
        assert_eq!(t.encode("Hello world"), vec![15496, 995]);
        assert_eq!(t.encode("hello world"), vec![31373, 995]);
        assert_eq!(t.encode(" the"), vec![262]);
        assert_eq!(t.encode("\n\n"), vec![628]);
        assert!(!t.encode("<|endoftext|>").contains(&GPT2_EOT));
        assert_eq!(t.decode(&[GPT2_EOT]), "");
        assert_eq!(t.vocab_size(), 50_257);
    }

    #[test]
    fn gpt2_round_trips_arbitrary_utf8() {
        let t = gpt2();
        for s in [
            "naïve café — 東京 🚀 \u{200b}zero-width",
            "  leading spaces\t\ttabs\r\n\r\nCRLF  ",
            "Ω≈ç√∫˜µ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u{2028} line separator",
            "",
        ] {
            assert_eq!(t.decode(&t.encode(s)), s);
        }
    }

    #[test]
    fn cutting_at_safe_points_keeps_the_tokens() {
        let text = "The quick  brown fox's den.\n\nIt's 2026: 3.14159 π ≈ pie!!\n  indented\tline \
                    \u{3000}ideographic space 東京 words\u{2028}after  double  spaces. end \n"
            .repeat(20);
        for tok in [gpt2(), Tokenizer::new(TokenizerKind::Bytes)] {
            let whole = tok.encode(&text);
            for min_chunk in [1, 7, 64, 1000] {
                let cuts = safe_cuts(&text, min_chunk);
                assert!(!cuts.is_empty());
                let mut pieces = Vec::new();
                let mut start = 0;
                for &c in cuts.iter().chain(std::iter::once(&text.len())) {
                    pieces.extend(tok.encode(&text[start..c]));
                    start = c;
                }
                assert_eq!(pieces, whole, "{tok:?} min_chunk {min_chunk}");
            }
        }
    }
}
