//! The JSON <-> Automerge mapping, and writes that emit only what changed.
//!
//! Reading: maps and tables become objects, lists arrays, text and strings strings, `Int`
//! and `Uint` integers, `F64` floats (a non-finite float reads as `null`), counters their
//! current integer value, timestamps integer milliseconds since the Unix epoch, bytes a
//! standard padded base64 string, booleans and null themselves, and scalar types from a
//! future Automerge version `null`.
//!
//! Writing: objects become maps, arrays lists, strings scalar strings, integers that fit
//! `i64` become `Int`, larger non-negative integers `Uint`, other numbers `F64`. A write
//! compares the new value with the current one and emits ops only where they differ; it
//! keeps the Automerge type already there when the JSON value still fits it (an edited
//! string stays a text object and is spliced, a new integer on a counter becomes an
//! increment), so apps that use those types directly keep their merge semantics.

use automerge::transaction::Transactable;
use automerge::{AutomergeError, ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value, ROOT};
use base64::Engine as _;
use serde_json::{Map, Number, Value as Json};

use crate::error::ModelError;

/// Root key that marks a document as deleted. Reserved: user content may not use it.
pub const TOMBSTONE_KEY: &str = "@deleted";

/// Deepest nesting of objects and lists a document may have below its root. Readers
/// recurse once per level, so a deeper document (a peer can build one 100,000 levels deep
/// in a few kilobytes) would overflow the stack of every node that reads it. Writes,
/// imports and sync refuse what goes deeper, and readers refuse to read past it.
pub const MAX_DEPTH: usize = 100;

/// How strings written through JSON are stored. Text (what `@automerge/automerge` 3 makes
/// of a JS string) merges concurrent edits character by character, and JS reads it as a
/// string; a scalar string is one value, so concurrent writes pick one winner (the other
/// stays visible as a conflict), and JS 3 reads it as an `ImmutableString` object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strings {
    /// As the document already does: text if the first string found in it is text,
    /// scalar otherwise (a document without strings gets scalars).
    #[default]
    Auto,
    /// Collaborative text.
    Text,
    /// Scalar strings.
    Scalar,
}

/// Values [`Strings::Auto`] looks at before it settles for scalars, so a huge document
/// without strings costs a bounded walk.
const AUTO_LOOKS_AT: usize = 10_000;

impl Strings {
    /// `auto`, `text` or `scalar`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "text" => Some(Self::Text),
            "scalar" => Some(Self::Scalar),
            _ => None,
        }
    }

    /// The name [`Strings::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Text => "text",
            Self::Scalar => "scalar",
        }
    }

    /// Whether new strings written into `doc` become text.
    pub fn as_text<R: ReadDoc>(self, doc: &R) -> bool {
        match self {
            Self::Text => true,
            Self::Scalar => false,
            Self::Auto => first_string_is_text(doc).unwrap_or(false),
        }
    }
}

/// Whether `content` holds a string anywhere: only then does the mode matter, so a write
/// without one never walks the document for [`Strings::Auto`]. Iterative, like
/// [`check_depth`].
fn has_string(content: &Map<String, Json>) -> bool {
    let mut stack: Vec<&Json> = content.values().collect();
    while let Some(v) = stack.pop() {
        match v {
            Json::String(_) => return true,
            Json::Object(m) => stack.extend(m.values()),
            Json::Array(a) => stack.extend(a.iter()),
            _ => {}
        }
    }
    false
}

/// Whether the first string met in a breadth-first walk of `doc` is text; `None` if none
/// is met within [`AUTO_LOOKS_AT`] values.
fn first_string_is_text<R: ReadDoc>(doc: &R) -> Option<bool> {
    let mut queue = std::collections::VecDeque::from([ROOT]);
    let mut looked = 0usize;
    while let Some(obj) = queue.pop_front() {
        let budget = AUTO_LOOKS_AT.saturating_sub(looked) + 1;
        let values: Vec<(Value<'_>, ObjId)> = match doc.object_type(&obj) {
            Ok(ObjType::Map | ObjType::Table) => doc
                .keys(&obj)
                .filter_map(|k| doc.get(&obj, k.as_str()).ok().flatten())
                .take(budget)
                .collect(),
            Ok(ObjType::List) => (0..doc.length(&obj))
                .filter_map(|i| doc.get(&obj, i).ok().flatten())
                .take(budget)
                .collect(),
            _ => Vec::new(),
        };
        for (value, id) in values {
            looked += 1;
            if looked > AUTO_LOOKS_AT {
                return None;
            }
            match value {
                Value::Object(ObjType::Text) => return Some(true),
                Value::Scalar(s) if matches!(s.as_ref(), ScalarValue::Str(_)) => {
                    return Some(false)
                }
                Value::Object(_) => queue.push_back(id),
                Value::Scalar(_) => {}
            }
        }
    }
    None
}

/// Reads the document's user content (the root without the tombstone) as a JSON object;
/// [`ModelError::TooDeep`] for content nested past [`MAX_DEPTH`].
pub fn read_root<R: ReadDoc>(doc: &R) -> Result<Map<String, Json>, ModelError> {
    let mut out = read_map_at(doc, &ROOT, 0)?;
    out.remove(TOMBSTONE_KEY);
    Ok(out)
}

/// Whether the document carries a tombstone, so reads answer "not found".
pub fn is_deleted<R: ReadDoc>(doc: &R) -> bool {
    matches!(
        doc.get(ROOT, TOMBSTONE_KEY),
        Ok(Some((Value::Scalar(s), _))) if matches!(s.as_ref(), ScalarValue::Boolean(true))
    )
}

/// Reads the map (or table) `obj`, `depth` levels below the root, as a JSON object.
fn read_map_at<R: ReadDoc>(
    doc: &R,
    obj: &ObjId,
    depth: usize,
) -> Result<Map<String, Json>, ModelError> {
    // One pass over the map's ops: a lookup per key would seek the op set once per key.
    let mut out = Map::new();
    for item in doc.map_range(obj, ..) {
        let id = if matches!(item.value, automerge::ValueRef::Object(_)) {
            item.id()
        } else {
            ROOT
        };
        let v = read_value_at(doc, item.value.into_value(), &id, depth + 1)?;
        out.insert(item.key.into_owned(), v);
    }
    Ok(out)
}

/// Reads one value (`id` is the object id when `value` is an object) as JSON, counting
/// depth from it; [`ModelError::TooDeep`] past [`MAX_DEPTH`].
pub fn read_value<R: ReadDoc>(doc: &R, value: Value<'_>, id: &ObjId) -> Result<Json, ModelError> {
    read_value_at(doc, value, id, 0)
}

/// [`read_value`] for a value `depth` levels below the root.
pub(crate) fn read_value_at<R: ReadDoc>(
    doc: &R,
    value: Value<'_>,
    id: &ObjId,
    depth: usize,
) -> Result<Json, ModelError> {
    if depth > MAX_DEPTH && matches!(value, Value::Object(_)) {
        return Err(ModelError::TooDeep { limit: MAX_DEPTH });
    }
    Ok(match value {
        Value::Scalar(s) => scalar_to_json(&s),
        Value::Object(ObjType::Map | ObjType::Table) => Json::Object(read_map_at(doc, id, depth)?),
        Value::Object(ObjType::List) => {
            let mut items = Vec::with_capacity(doc.length(id));
            for item in doc.list_range(id, ..) {
                let child = if matches!(item.value, automerge::ValueRef::Object(_)) {
                    item.id()
                } else {
                    ROOT
                };
                items.push(read_value_at(
                    doc,
                    item.value.into_value(),
                    &child,
                    depth + 1,
                )?);
            }
            Json::Array(items)
        }
        Value::Object(ObjType::Text) => Json::String(doc.text(id).unwrap_or_default()),
    })
}

/// Refuses JSON content nested deeper than [`MAX_DEPTH`]. Iterative: the content may come
/// from an app that built it deeper than any parser would have allowed.
pub fn check_depth(content: &Map<String, Json>) -> Result<(), ModelError> {
    let mut stack: Vec<(&Json, usize)> = content.values().map(|v| (v, 1)).collect();
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Json>> = match v {
            Json::Object(m) => Box::new(m.values()),
            Json::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        if depth > MAX_DEPTH {
            return Err(ModelError::TooDeep { limit: MAX_DEPTH });
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    Ok(())
}

/// The JSON form of an Automerge scalar (see the module doc for the mapping).
pub fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) => Json::Number((*i).into()),
        ScalarValue::Uint(u) => Json::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::Number(i64::from(c).into()),
        ScalarValue::Timestamp(t) => Json::Number((*t).into()),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
    }
}

/// The Automerge scalar a JSON scalar is stored as. `None` for objects and arrays.
fn json_to_scalar(v: &Json) -> Option<ScalarValue> {
    Some(match v {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::Array(_) | Json::Object(_) => return None,
    })
}

/// Refuses root content the model cannot store as given.
pub fn check_root_keys(content: &Map<String, Json>) -> Result<(), ModelError> {
    if content.contains_key(TOMBSTONE_KEY) {
        return Err(ModelError::ReservedKey(TOMBSTONE_KEY.to_owned()));
    }
    Ok(())
}

/// Replaces the user content with `content` and clears any tombstone, emitting ops only for
/// what differs.
pub fn write_replace<T: Transactable>(
    tx: &mut T,
    content: &Map<String, Json>,
    strings: Strings,
) -> Result<(), AutomergeError> {
    let text = has_string(content) && strings.as_text(tx);
    update_map(tx, text, &ROOT, content, true)?;
    clear_tombstone(tx)
}

/// Applies an RFC 7386 merge patch to the user content. A deleted document is treated as
/// `{}`. A leaf the patch names explicitly is written even when equal to the visible value if
/// that value has concurrent alternatives: naming it is how a client resolves the conflict.
pub fn write_merge_patch<T: Transactable>(
    tx: &mut T,
    patch: &Map<String, Json>,
    strings: Strings,
) -> Result<(), AutomergeError> {
    let text = has_string(patch) && strings.as_text(tx);
    if is_deleted(tx) {
        update_map(tx, text, &ROOT, &Map::new(), true)?;
        clear_tombstone(tx)?;
    }
    merge_patch_map(tx, text, &ROOT, patch)
}

/// Removes the user content and sets the tombstone.
pub fn write_delete<T: Transactable>(tx: &mut T) -> Result<(), AutomergeError> {
    update_map(tx, false, &ROOT, &Map::new(), true)?;
    if !is_deleted(tx) {
        tx.put(ROOT, TOMBSTONE_KEY, true)?;
    }
    Ok(())
}

fn clear_tombstone<T: Transactable>(tx: &mut T) -> Result<(), AutomergeError> {
    if tx.get(ROOT, TOMBSTONE_KEY)?.is_some() {
        tx.delete(ROOT, TOMBSTONE_KEY)?;
    }
    Ok(())
}

fn merge_patch_map<T: Transactable>(
    tx: &mut T,
    text: bool,
    obj: &ObjId,
    patch: &Map<String, Json>,
) -> Result<(), AutomergeError> {
    for (key, value) in patch {
        let prop = Prop::Map(key.clone());
        match value {
            Json::Null => {
                if tx.get(obj, prop.clone())?.is_some() {
                    tx.delete(obj, prop)?;
                }
            }
            Json::Object(inner) => {
                let child = match tx.get(obj, prop.clone())? {
                    Some((Value::Object(ObjType::Map | ObjType::Table), id)) => id,
                    _ => tx.put_object(obj, prop, ObjType::Map)?,
                };
                merge_patch_map(tx, text, &child, inner)?;
            }
            leaf => {
                if tx.get_all(obj, prop.clone())?.len() > 1 {
                    put_fresh(tx, text, obj, prop, leaf)?;
                } else {
                    update_prop(tx, text, obj, prop, leaf)?;
                }
            }
        }
    }
    Ok(())
}

/// Makes map `obj` equal `new`. At the root, the tombstone key is left to the caller.
fn update_map<T: Transactable>(
    tx: &mut T,
    text: bool,
    obj: &ObjId,
    new: &Map<String, Json>,
    is_root: bool,
) -> Result<(), AutomergeError> {
    let stale: Vec<String> = tx
        .keys(obj)
        .filter(|k| !(new.contains_key(k) || (is_root && k == TOMBSTONE_KEY)))
        .collect();
    for key in stale {
        tx.delete(obj, key)?;
    }
    for (key, value) in new {
        update_prop(tx, text, obj, Prop::Map(key.clone()), value)?;
    }
    Ok(())
}

/// Makes the existing property `prop` of `obj` equal `new`, reusing what is there.
fn update_prop<T: Transactable>(
    tx: &mut T,
    text: bool,
    obj: &ObjId,
    prop: Prop,
    new: &Json,
) -> Result<(), AutomergeError> {
    match (tx.get(obj, prop.clone())?, new) {
        (Some((Value::Object(ObjType::Map | ObjType::Table), id)), Json::Object(m)) => {
            update_map(tx, text, &id, m, false)
        }
        (Some((Value::Object(ObjType::List), id)), Json::Array(items)) => {
            update_list(tx, text, &id, items)
        }
        (Some((Value::Object(ObjType::Text), id)), Json::String(s)) => {
            if tx.text(&id)? != *s {
                tx.update_text(&id, s)?;
            }
            Ok(())
        }
        (Some((Value::Scalar(current), _)), new) if scalar_to_json(&current) == *new => Ok(()),
        (Some((Value::Scalar(current), _)), Json::Number(n))
            if matches!(current.as_ref(), ScalarValue::Counter(_)) && n.is_i64() =>
        {
            let now = match current.as_ref() {
                ScalarValue::Counter(c) => i64::from(c),
                _ => 0,
            };
            let target = n.as_i64().unwrap_or(now);
            tx.increment(obj, prop, target.wrapping_sub(now))
        }
        // A string that was a scalar stays one: the mode is for new values, so that no
        // write changes the type of a string an app already reads.
        (Some((Value::Scalar(current), _)), Json::String(_))
            if matches!(current.as_ref(), ScalarValue::Str(_)) =>
        {
            put_fresh(tx, false, obj, prop, new)
        }
        _ => put_fresh(tx, text, obj, prop, new),
    }
}

/// Writes `new` at `prop` as a new value, discarding what was there.
fn put_fresh<T: Transactable>(
    tx: &mut T,
    text: bool,
    obj: &ObjId,
    prop: Prop,
    new: &Json,
) -> Result<(), AutomergeError> {
    match new {
        Json::Object(m) => {
            let id = tx.put_object(obj, prop, ObjType::Map)?;
            update_map(tx, text, &id, m, false)
        }
        Json::Array(items) => {
            let id = tx.put_object(obj, prop, ObjType::List)?;
            update_list(tx, text, &id, items)
        }
        Json::String(s) if text => {
            let id = tx.put_object(obj, prop, ObjType::Text)?;
            tx.update_text(&id, s)
        }
        scalar => match json_to_scalar(scalar) {
            Some(s) => tx.put(obj, prop, s),
            None => Ok(()),
        },
    }
}

/// Inserts `new` into list `list` at `index`.
fn insert_fresh<T: Transactable>(
    tx: &mut T,
    text: bool,
    list: &ObjId,
    index: usize,
    new: &Json,
) -> Result<(), AutomergeError> {
    match new {
        Json::Object(m) => {
            let id = tx.insert_object(list, index, ObjType::Map)?;
            update_map(tx, text, &id, m, false)
        }
        Json::Array(items) => {
            let id = tx.insert_object(list, index, ObjType::List)?;
            update_list(tx, text, &id, items)
        }
        Json::String(s) if text => {
            let id = tx.insert_object(list, index, ObjType::Text)?;
            tx.update_text(&id, s)
        }
        scalar => match json_to_scalar(scalar) {
            Some(s) => tx.insert(list, index, s),
            None => Ok(()),
        },
    }
}

/// Makes list `list` equal `new`: the common prefix and suffix are left alone, the middle is
/// updated in place and then shortened or extended, so an insertion or removal at either end
/// costs one op rather than a rewrite of the list.
fn update_list<T: Transactable>(
    tx: &mut T,
    text: bool,
    list: &ObjId,
    new: &[Json],
) -> Result<(), AutomergeError> {
    // Only compared: an item too deep to read counts as changed and is rewritten.
    let old: Vec<Json> = (0..tx.length(list))
        .map(|i| match tx.get(list, i) {
            Ok(Some((v, id))) => read_value(tx, v, &id).unwrap_or(Json::Null),
            _ => Json::Null,
        })
        .collect();
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let suffix = old[prefix..]
        .iter()
        .rev()
        .zip(new[prefix..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let old_mid = old.len() - prefix - suffix;
    let new_mid = new.len() - prefix - suffix;
    let common = old_mid.min(new_mid);
    for (i, value) in new.iter().enumerate().skip(prefix).take(common) {
        update_prop(tx, text, list, Prop::Seq(i), value)?;
    }
    let at = prefix + common;
    for _ in new_mid..old_mid {
        tx.delete(list, at)?;
    }
    for (offset, value) in new[at..prefix + new_mid].iter().enumerate() {
        insert_fresh(tx, text, list, at + offset, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transaction;
    use automerge::Automerge;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Json) -> Map<String, Json> {
        match v {
            Json::Object(m) => m,
            _ => panic!("test value is not an object"),
        }
    }

    /// Applies `f` in one transaction and returns how many ops it emitted.
    fn ops(doc: &mut Automerge, f: impl FnOnce(&mut Transaction<'_>)) -> usize {
        let mut tx = doc.transaction();
        f(&mut tx);
        let n = tx.pending_ops();
        tx.commit();
        n
    }

    fn put(doc: &mut Automerge, v: &Map<String, Json>) -> usize {
        ops(doc, |tx| {
            write_replace(tx, v, Strings::Scalar).expect("replace")
        })
    }

    #[test]
    fn floats_and_integers_stay_apart() {
        let mut doc = Automerge::new();
        let v = obj(json!({"i": 1, "f": 1.0, "big": u64::MAX, "neg": -5, "e": 1.5e300}));
        put(&mut doc, &v);
        let back = read_root(&doc).expect("reads");
        assert_eq!(back, v);
        assert!(back["f"].is_f64() && back["i"].is_i64() && back["big"].is_u64());
    }

    #[test]
    fn same_object_twice_emits_nothing() {
        let mut doc = Automerge::new();
        let v = obj(json!({"a": {"b": [1, 2, {"c": null}]}, "s": "x"}));
        assert!(put(&mut doc, &v) > 0);
        assert_eq!(put(&mut doc, &v), 0);
    }

    #[test]
    fn one_field_changed_emits_one_op() {
        let mut doc = Automerge::new();
        put(&mut doc, &obj(json!({"a": 1, "b": {"c": [1, 2, 3]}})));
        assert_eq!(
            put(&mut doc, &obj(json!({"a": 2, "b": {"c": [1, 2, 3]}}))),
            1
        );
        assert_eq!(
            put(&mut doc, &obj(json!({"a": 2, "b": {"c": [0, 1, 2, 3]}}))),
            1
        );
        assert_eq!(
            put(&mut doc, &obj(json!({"a": 2, "b": {"c": [0, 1, 2]}}))),
            1
        );
    }

    #[test]
    fn text_and_counter_types_are_kept() {
        let mut doc = Automerge::new();
        let (text, _) = {
            let mut tx = doc.transaction();
            let t = tx.put_object(ROOT, "t", ObjType::Text).expect("text");
            tx.splice_text(&t, 0, 0, "hello").expect("splice");
            tx.put(ROOT, "n", ScalarValue::counter(5)).expect("counter");
            (t, tx.commit())
        };
        assert_eq!(
            read_root(&doc).expect("reads"),
            obj(json!({"t": "hello", "n": 5}))
        );
        put(&mut doc, &obj(json!({"t": "hello world", "n": 8})));
        assert_eq!(doc.object_type(&text).expect("type"), ObjType::Text);
        assert!(matches!(
            doc.get(ROOT, "n").expect("get"),
            Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_))
        ));
        assert_eq!(
            read_root(&doc).expect("reads"),
            obj(json!({"t": "hello world", "n": 8}))
        );
    }

    #[test]
    fn delete_then_recreate() {
        let mut doc = Automerge::new();
        put(&mut doc, &obj(json!({"a": 1})));
        ops(&mut doc, |tx| write_delete(tx).expect("delete"));
        assert!(is_deleted(&doc));
        assert_eq!(read_root(&doc).expect("reads"), Map::new());
        ops(&mut doc, |tx| {
            write_merge_patch(tx, &obj(json!({"b": 2})), Strings::Scalar).expect("patch")
        });
        assert!(!is_deleted(&doc));
        assert_eq!(read_root(&doc).expect("reads"), obj(json!({"b": 2})));
    }

    #[test]
    fn non_json_types_read_as_documented() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, "ts", ScalarValue::Timestamp(1_700_000_000_000))
            .expect("ts");
        tx.put(ROOT, "b", ScalarValue::Bytes(vec![0, 1, 2]))
            .expect("bytes");
        tx.put(ROOT, "nan", f64::NAN).expect("nan");
        tx.commit();
        assert_eq!(
            read_root(&doc).expect("reads"),
            obj(json!({"ts": 1_700_000_000_000_i64, "b": "AAEC", "nan": null}))
        );
    }

    #[test]
    fn unknown_scalars_read_as_null() {
        let unknown = ScalarValue::Unknown {
            type_code: 20,
            bytes: vec![1],
        };
        assert_eq!(scalar_to_json(&unknown), Json::Null);
    }

    fn arb_json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|u| json!(u)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Json::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                prop::collection::btree_map("[a-z@]{0,6}", inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    /// The Automerge type of root key `key`.
    fn kind(doc: &Automerge, key: &str) -> Option<ObjType> {
        match doc.get(ROOT, key).expect("get") {
            Some((Value::Object(t), _)) => Some(t),
            _ => None,
        }
    }

    #[test]
    fn text_mode_writes_new_strings_as_text_and_reads_them_back() {
        let mut doc = Automerge::new();
        let v = obj(json!({"s": "eu-west", "list": ["a", {"b": "c"}], "n": 1}));
        ops(&mut doc, |tx| {
            write_replace(tx, &v, Strings::Text).expect("replace");
        });
        assert_eq!(kind(&doc, "s"), Some(ObjType::Text));
        let list = doc.get(ROOT, "list").expect("get").expect("list").1;
        assert!(matches!(
            doc.get(&list, 0).expect("get"),
            Some((Value::Object(ObjType::Text), _))
        ));
        assert_eq!(read_root(&doc).expect("reads"), v);
    }

    #[test]
    fn auto_follows_the_documents_first_string() {
        // A document whose strings are text (as JS makes them) gets text.
        let mut js = Automerge::new();
        ops(&mut js, |tx| {
            let t = tx.put_object(ROOT, "title", ObjType::Text).expect("text");
            tx.update_text(&t, "hello").expect("splice");
        });
        ops(&mut js, |tx| {
            write_merge_patch(tx, &obj(json!({"region": "eu-west"})), Strings::Auto)
                .expect("patch");
        });
        assert_eq!(kind(&js, "region"), Some(ObjType::Text));
        // One of scalars, or none at all, gets scalars.
        let mut plain = Automerge::new();
        ops(&mut plain, |tx| {
            write_replace(tx, &obj(json!({"a": "x"})), Strings::Scalar).expect("put");
        });
        ops(&mut plain, |tx| {
            write_merge_patch(tx, &obj(json!({"b": "y"})), Strings::Auto).expect("patch");
        });
        assert_eq!(kind(&plain, "b"), None);
        let mut empty = Automerge::new();
        ops(&mut empty, |tx| {
            write_replace(tx, &obj(json!({"a": "x"})), Strings::Auto).expect("put");
        });
        assert_eq!(kind(&empty, "a"), None);
    }

    #[test]
    fn text_mode_keeps_an_existing_scalar_a_scalar() {
        let mut doc = Automerge::new();
        ops(&mut doc, |tx| {
            write_replace(tx, &obj(json!({"a": "x"})), Strings::Scalar).expect("put");
        });
        ops(&mut doc, |tx| {
            write_merge_patch(tx, &obj(json!({"a": "y", "b": "new"})), Strings::Text)
                .expect("patch");
        });
        assert_eq!(kind(&doc, "a"), None, "the scalar stays a scalar");
        assert_eq!(kind(&doc, "b"), Some(ObjType::Text));
        assert_eq!(
            read_root(&doc).expect("reads"),
            obj(json!({"a": "y", "b": "new"}))
        );
    }

    #[test]
    fn scalar_mode_keeps_existing_text_a_text() {
        let mut doc = Automerge::new();
        ops(&mut doc, |tx| {
            write_replace(tx, &obj(json!({"t": "abc"})), Strings::Text).expect("put");
        });
        ops(&mut doc, |tx| {
            write_replace(tx, &obj(json!({"t": "abd", "u": "new"})), Strings::Scalar).expect("put");
        });
        assert_eq!(kind(&doc, "t"), Some(ObjType::Text));
        assert_eq!(kind(&doc, "u"), None);
        assert_eq!(
            read_root(&doc).expect("reads"),
            obj(json!({"t": "abd", "u": "new"}))
        );
    }

    fn arb_root() -> impl Strategy<Value = Map<String, Json>> {
        prop::collection::btree_map("[a-z]{1,6}", arb_json(), 0..8)
            .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #[test]
        fn put_then_get_is_equal(v in arb_root()) {
            let mut doc = Automerge::new();
            put(&mut doc, &v);
            prop_assert_eq!(read_root(&doc).expect("reads"), v.clone());
            // And it survives a save/load round trip.
            let loaded = Automerge::load(&doc.save()).expect("load");
            prop_assert_eq!(read_root(&loaded).expect("reads"), v);
        }

        #[test]
        fn replace_is_minimal_and_exact(a in arb_root(), b in arb_root()) {
            let mut doc = Automerge::new();
            put(&mut doc, &a);
            put(&mut doc, &b);
            prop_assert_eq!(read_root(&doc).expect("reads"), b.clone());
            prop_assert_eq!(put(&mut doc, &b), 0);
        }
    }
}
