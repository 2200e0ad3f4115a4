//! The conflicts view: every visible path whose value has concurrent alternatives.

use automerge::{ObjId, ObjType, Prop, ReadDoc, Value, ROOT};
use serde::Serialize;
use serde_json::Value as Json;

use super::json::{read_value, TOMBSTONE_KEY};

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
pub fn conflicts<R: ReadDoc>(doc: &R) -> Vec<Conflict> {
    let mut out = Vec::new();
    walk(doc, &ROOT, ObjType::Map, String::new(), &mut out);
    out
}

fn walk<R: ReadDoc>(doc: &R, obj: &ObjId, ty: ObjType, path: String, out: &mut Vec<Conflict>) {
    let props: Vec<Prop> = match ty {
        ObjType::Map | ObjType::Table => doc
            .keys(obj)
            .filter(|k| !(path.is_empty() && k == TOMBSTONE_KEY))
            .map(Prop::Map)
            .collect(),
        ObjType::List => (0..doc.length(obj)).map(Prop::Seq).collect(),
        ObjType::Text => return,
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
            let mut values = vec![read_value(doc, winner.clone(), &winner_id)];
            values.extend(
                all.into_iter()
                    .filter(|(_, id)| *id != winner_id)
                    .map(|(v, id)| read_value(doc, v, &id)),
            );
            out.push(Conflict {
                path: child_path.clone(),
                values,
            });
        }
        if let Value::Object(child_ty) = winner {
            walk(doc, &winner_id, child_ty, child_path, out);
        }
    }
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
        let found = conflicts(&a);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "/a~1b/x");
        let winner = super::super::json::read_root(&a)["a/b"]["x"].clone();
        assert_eq!(found[0].values[0], winner);
        let mut vals = found[0].values.clone();
        vals.sort_by_key(|v| v.as_i64());
        assert_eq!(vals, vec![json!(1), json!(2)]);
    }
}
