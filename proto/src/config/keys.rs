//! Unknown keys, every one of them, in the order they appear in the file.
//!
//! serde's `deny_unknown_fields` stops at the first unknown key (and a misspelt required
//! key then also hides everything after it behind "missing field"). Instead the keys a
//! file may hold are read once from the config types' own `Deserialize` impls (a probe
//! deserializer that records the fields each struct asks for), and the parsed document,
//! which keeps each key's position, is walked against them:
//!
//! ```text
//!  AgentFile: Deserialize ──probe──▶ Shape::Table[("gateway", List(Table[name, address…])), …]
//!  agent.toml ──toml parser──▶ DeTable with spans ──walk(Shape)──▶ unknown keys, by line
//! ```
//!
//! serde then deserializes the same text without refusing unknown keys, so its type and
//! missing-field errors are reported beside them.

use std::fmt;

use serde::de::{self, DeserializeSeed, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// The keys a config type accepts, as its `Deserialize` impl asks for them.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Shape {
    /// A value with no keys of ours inside (a string, a number, a list of strings…).
    Value,
    /// A table with exactly these keys.
    Table(Vec<(&'static str, Shape)>),
    /// A table whose keys the user names (`[service.NAME]`), each holding this.
    Named(Box<Shape>),
    /// An array whose every element holds this.
    List(Box<Shape>),
}

/// A key the file holds that its table does not take.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct UnknownKey {
    /// Byte offset of the key in the text.
    pub offset: usize,
    /// Where it is, e.g. `gateway[0].adress`.
    pub path: String,
    /// What the user should do.
    pub advice: String,
}

impl Shape {
    /// The shape of `T`, read from its `Deserialize` impl; `None` for a type the probe
    /// cannot follow (an externally tagged enum, a tuple): the unit tests prove that
    /// both config files' types are followed.
    pub(super) fn of<'de, T: de::Deserialize<'de>>() -> Option<Shape> {
        let mut shape = Shape::Value;
        T::deserialize(Probe(&mut shape)).ok()?;
        Some(shape)
    }

    /// Every key of `document` this shape does not take, in the order of the text.
    pub(super) fn unknown_keys(&self, document: &DeTable<'_>) -> Vec<UnknownKey> {
        let mut found = Vec::new();
        self.walk_table(document, "", &mut found);
        found.sort_by_key(|u| u.offset);
        found
    }

    fn walk(&self, value: &Spanned<DeValue<'_>>, path: &str, found: &mut Vec<UnknownKey>) {
        match (self, value.get_ref()) {
            (Shape::Table(_) | Shape::Named(_), DeValue::Table(table)) => {
                self.walk_table(table, path, found);
            }
            (Shape::List(element), DeValue::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    element.walk(item, &format!("{path}[{i}]"), found);
                }
            }
            // A value of the wrong type is serde's to report.
            _ => {}
        }
    }

    fn walk_table(&self, table: &DeTable<'_>, path: &str, found: &mut Vec<UnknownKey>) {
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            let inner = join(path, name);
            match self {
                Shape::Table(fields) => match fields.iter().find(|(field, _)| *field == name) {
                    Some((_, shape)) => shape.walk(value, &inner, found),
                    None => found.push(UnknownKey {
                        offset: key.span().start,
                        path: inner,
                        advice: advice(name, fields.iter().map(|(f, _)| *f)),
                    }),
                },
                Shape::Named(shape) => shape.walk(value, &inner, found),
                Shape::Value | Shape::List(_) => {}
            }
        }
    }
}

/// `path.key`, with the key quoted when it is not a bare TOML key.
fn join(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let key = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

/// "did you mean `address`?" for a near miss, else the keys the table takes.
fn advice<'k>(key: &str, known: impl Iterator<Item = &'k str> + Clone) -> String {
    let nearest = known
        .clone()
        .map(|k| (edit_distance(&key.to_ascii_lowercase(), k), k))
        .filter(|(d, k)| *d <= 2 && *d < k.len().min(key.len()))
        .min_by_key(|(d, _)| *d);
    match nearest {
        Some((_, k)) => format!("unknown key; did you mean `{k}`?"),
        None => {
            let all: Vec<&str> = known.collect();
            format!(
                "unknown key (remove it; this table takes {})",
                all.join(", ")
            )
        }
    }
}

/// Levenshtein distance, for suggestions (keys are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The probe's only error: a type it cannot follow.
#[derive(Debug)]
struct ProbeError(String);

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProbeError {}

impl de::Error for ProbeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ProbeError(msg.to_string())
    }
}

/// A deserializer that answers every question with an empty value, recording the
/// fields each struct asks for into its `Shape`.
struct Probe<'a>(&'a mut Shape);

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = ProbeError;

    /// Types that take any value (untagged enums) are values.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_str("")
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_bool(false)
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_i64(0)
    }

    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_i64(0)
    }

    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_i64(0)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_i64(0)
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_u64(0)
    }

    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_u64(0)
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_u64(0)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_u64(0)
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_f64(0.0)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_f64(0.0)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_char(' ')
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_str("")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_str("")
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_bytes(&[])
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_bytes(&[])
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        let mut element = Shape::Value;
        let value = visitor.visit_seq(OneElement(Some(&mut element)))?;
        *self.0 = Shape::List(Box::new(element));
        Ok(value)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        _visitor: V,
    ) -> Result<V::Value, ProbeError> {
        Err(ProbeError("tuples are not followed".into()))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        _visitor: V,
    ) -> Result<V::Value, ProbeError> {
        Err(ProbeError("tuple structs are not followed".into()))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        let mut entry = Shape::Value;
        let value = visitor.visit_map(OneEntry(Some(&mut entry)))?;
        *self.0 = Shape::Named(Box::new(entry));
        Ok(value)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        let mut shapes: Vec<(&'static str, Shape)> =
            fields.iter().map(|f| (*f, Shape::Value)).collect();
        let value = visitor.visit_map(Fields {
            shapes: &mut shapes,
            next: 0,
        })?;
        *self.0 = Shape::Table(shapes);
        Ok(value)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        _variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ProbeError> {
        Err(ProbeError(format!("enum {name} is not followed")))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_str("")
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_unit()
    }
}

/// A sequence of one element, whose shape is recorded.
struct OneElement<'a>(Option<&'a mut Shape>);

impl<'de> de::SeqAccess<'de> for OneElement<'_> {
    type Error = ProbeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ProbeError> {
        match self.0.take() {
            Some(shape) => seed.deserialize(Probe(shape)).map(Some),
            None => Ok(None),
        }
    }
}

/// A map of one entry, whose value's shape is recorded.
struct OneEntry<'a>(Option<&'a mut Shape>);

impl<'de> de::MapAccess<'de> for OneEntry<'_> {
    type Error = ProbeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ProbeError> {
        if self.0.is_none() {
            return Ok(None);
        }
        seed.deserialize(de::value::StrDeserializer::<ProbeError>::new("name"))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ProbeError> {
        let shape = self
            .0
            .take()
            .ok_or_else(|| ProbeError("a value without a key".into()))?;
        seed.deserialize(Probe(shape))
    }
}

/// Every field of a struct, each value probed for its own shape.
struct Fields<'a> {
    shapes: &'a mut Vec<(&'static str, Shape)>,
    next: usize,
}

impl<'de> de::MapAccess<'de> for Fields<'_> {
    type Error = ProbeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ProbeError> {
        let Some((name, _)) = self.shapes.get(self.next) else {
            return Ok(None);
        };
        seed.deserialize(de::value::BorrowedStrDeserializer::<ProbeError>::new(name))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ProbeError> {
        let (_, shape) = self
            .shapes
            .get_mut(self.next)
            .ok_or_else(|| ProbeError("a value without a key".into()))?;
        self.next += 1;
        seed.deserialize(Probe(shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only the shape is read")]
    struct Inner {
        address: String,
        port: Option<i64>,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    #[allow(dead_code, reason = "only the shape is read")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only the shape is read")]
    struct Outer {
        top: Option<f64>,
        #[serde(default)]
        list: Vec<Inner>,
        #[serde(default)]
        named: BTreeMap<String, Inner>,
        either: OneOrMany,
    }

    fn inner() -> Shape {
        Shape::Table(vec![("address", Shape::Value), ("port", Shape::Value)])
    }

    #[test]
    fn the_probe_reads_fields_lists_and_named_tables() {
        assert_eq!(
            Shape::of::<Outer>(),
            Some(Shape::Table(vec![
                ("top", Shape::Value),
                ("list", Shape::List(Box::new(inner()))),
                ("named", Shape::Named(Box::new(inner()))),
                ("either", Shape::Value),
            ]))
        );
    }

    #[test]
    fn unknown_keys_come_in_line_order_with_their_path() {
        let text = "zz = 1\ntop = 1.0\neither = \"x\"\n[[list]]\naddress = \"\"\nadress = 2\n[named.\"x.y\"]\naddress = \"\"\nc = 3\n[[list]]\nPort = 1\n";
        let shape = Shape::of::<Outer>().expect("shape");
        let document = DeTable::parse(text).expect("toml");
        let found = shape.unknown_keys(document.get_ref());
        let paths: Vec<&str> = found.iter().map(|u| u.path.as_str()).collect();
        assert_eq!(
            paths,
            ["zz", "list[0].adress", "named.\"x.y\".c", "list[1].Port"],
            "{found:#?}"
        );
        assert_eq!(found[1].advice, "unknown key; did you mean `address`?");
        assert_eq!(found[3].advice, "unknown key; did you mean `port`?");
        assert_eq!(
            found[2].advice,
            "unknown key (remove it; this table takes address, port)"
        );
        assert_eq!(
            found[0].advice,
            "unknown key (remove it; this table takes top, list, named, either)"
        );
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("adress", "address"), 1);
        assert_eq!(edit_distance("alow", "allow"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("ping_timout", "ping_timeout"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
