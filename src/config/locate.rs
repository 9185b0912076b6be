// Where each key of a YAML document sits (line and column), for error messages.
// A schema-free pass over the text: it sees unknown keys too, and it never fails the load
// (a document it cannot read simply has no recorded positions).

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{DuplicateKeyPolicy, NonFiniteFloatPolicy, Options, Spanned};
use std::fmt;

/// Position of one key in the file (1-based line and column, as serde-saphyr reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    pub line: u64,
    pub column: u64,
}

/// Every key of a document with its dotted path, in document order.
#[derive(Debug, Default)]
pub(crate) struct KeyLocations {
    keys: Vec<(String, Position)>,
}

impl KeyLocations {
    /// Scans `text` for keys; an unreadable document yields an empty map.
    pub(crate) fn scan(text: &str) -> KeyLocations {
        let mut options = Options::default();
        // Accept what the typed parse may reject, so positions exist for its error messages too.
        options.non_finite_float_policy = NonFiniteFloatPolicy::PassThrough;
        options.duplicate_keys = DuplicateKeyPolicy::LastWins;
        let mut out = KeyLocations::default();
        if let Ok(root) = serde_saphyr::from_str_with_options::<Node>(text, options) {
            out.collect(&root, "");
        }
        out
    }

    fn collect(&mut self, node: &Node, prefix: &str) {
        if let Node::Map(entries) = node {
            for (key, value) in entries {
                let path = if prefix.is_empty() {
                    key.value.0.clone()
                } else {
                    format!("{prefix}.{}", key.value.0)
                };
                let at = Position {
                    line: key.referenced.line(),
                    column: key.referenced.column(),
                };
                self.keys.push((path.clone(), at));
                self.collect(value, &path);
            }
        }
    }

    /// Line of the key with this dotted path, if the document has it.
    pub(crate) fn line_of(&self, dotted: &str) -> Option<u64> {
        self.keys
            .iter()
            .rev()
            .find(|(path, _)| path == dotted)
            .map(|(_, at)| at.line)
    }

    /// The key an error at `at` belongs to: the last key that starts at or before it.
    pub(crate) fn key_at(&self, at: Position) -> Option<&str> {
        self.keys
            .iter()
            .filter(|(_, pos)| *pos <= at)
            .max_by_key(|(_, pos)| *pos)
            .map(|(path, _)| path.as_str())
    }
}

/// A YAML node reduced to its mapping structure; scalars and sequences are leaves.
enum Node {
    Map(Vec<(Spanned<KeyText>, Node)>),
    Leaf,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
            let value = map.next_value::<Spanned<Node>>()?;
            entries.push((key, value.value));
        }
        Ok(Node::Map(entries))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Node::Leaf)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
}

/// A mapping key written as text, whatever scalar type YAML gave it.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = KeyText;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a scalar mapping key")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
        Ok(KeyText(v.to_string()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
        Ok(KeyText("~".to_string()))
    }
}
