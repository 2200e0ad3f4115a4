//! The conflicts view: every visible path whose value has concurrent alternatives.

use automerge::{ObjId, ObjType, Prop, ReadDoc, Value, ROOT};
use serde::Serialize;
use serde_json::Value as Json;

use super::json::{read_value_at, MAX_DEPTH, TOMBSTONE_KEY};
use crate::error::ModelError;

/// One field with concurrent values. `values[0]` is the one every node shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Conflict {
    /// JSON Pointer (RFC 6901) to the field, e.g. `/a/b` or `/items/0`.
    pub path: String,
    /// All concurrent values, the visible winner first.
    pub values: Vec<Json>,
}

/// Lists the conflicts in the visible content of `doc`, in document order.
///
/// Only the winning branch is descended into: an alternative that is an object is reported
/// whole, as its JSON value.
/// [`ModelError::TooDeep`] for a document nested past [`MAX_DEPTH`].
pub fn conflicts<R: ReadDoc>(doc: &R) -> Result<Vec<Conflict>, ModelError> {
    let mut out = Vec::new();
    walk(doc, &ROOT, ObjType::Map, String::new(), 0, &mut out)?;
    Ok(out)
}

fn walk<R: ReadDoc>(
    doc: &R,
    obj: &ObjId,
    ty: ObjType,
    path: String,
    depth: usize,
    out: &mut Vec<Conflict>,
) -> Result<(), ModelError> {
    if depth > MAX_DEPTH {
        return Err(ModelError::TooDeep { limit: MAX_DEPTH });
    }
    let props: Vec<Prop> = match ty {
        ObjType::Map | ObjType::Table => doc
            .keys(obj)
            .filter(|k| !(path.is_empty() && k == TOMBSTONE_KEY))
            .map(Prop::Map)
            .collect(),
        ObjType::List => (0..doc.length(obj)).map(Prop::Seq).collect(),
        ObjType::Text => return Ok(()),
    };
    for prop in props {
        let child_path = format!("{path}/{}", pointer_token(&prop));
        let Ok(all) = doc.get_all(obj, prop.clone()) else {
            continue;
        };
        let Ok(Some((winner, winner_id))) = doc.get(obj, prop) else {
            continue;
        };
        if all.len() > 1 {
            let mut values = vec![read_value_at(doc, winner.clone(), &winner_id, depth + 1)?];
            for (v, id) in all.into_iter().filter(|(_, id)| *id != winner_id) {
                values.push(read_value_at(doc, v, &id, depth + 1)?);
            }
            out.push(Conflict {
                path: child_path.clone(),
                values,
            });
        }
        if let Value::Object(child_ty) = winner {
            walk(doc, &winner_id, child_ty, child_path, depth + 1, out)?;
        }
    }
    Ok(())
}

fn pointer_token(prop: &Prop) -> String {
    match prop {
        Prop::Map(k) => k.replace('~', "~0").replace('/', "~1"),
        Prop::Seq(i) => i.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, Automerge};
    use serde_json::json;

    #[test]
    fn concurrent_puts_are_listed_with_winner_first() {
        let mut a = Automerge::new().with_actor(ActorId::from([1u8; 16]));
        let mut tx = a.transaction();
        let m = tx.put_object(ROOT, "a/b", ObjType::Map).expect("map");
        tx.put(&m, "x", 0).expect("x");
        tx.commit();
        let mut b = a.fork().with_actor(ActorId::from([2u8; 16]));
        let mut tx = a.transaction();
        tx.put(&m, "x", 1).expect("x");
        tx.commit();
        let mut tx = b.transaction();
        tx.put(&m, "x", 2).expect("x");
        tx.commit();
        a.merge(&mut b).expect("merge");
        let found = conflicts(&a).expect("reads");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "/a~1b/x");
        let winner = super::super::json::read_root(&a).expect("reads")["a/b"]["x"].clone();
        assert_eq!(found[0].values[0], winner);
        let mut vals = found[0].values.clone();
        vals.sort_by_key(|v| v.as_i64());
        assert_eq!(vals, vec![json!(1), json!(2)]);
    }
}
