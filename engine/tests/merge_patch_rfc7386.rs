//! RFC 7386 §3 / Appendix A examples, applied by the store's PATCH.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use tidesync::store::StoreConfig;
use tidesync::{ModelError, StoreError};

/// The examples of RFC 7386 Appendix A: (original, patch, result).
fn appendix_a() -> Vec<(Value, Value, Value)> {
    vec![
        (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
        (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
        (json!({"a":"b"}), json!({"a":null}), json!({})),
        (
            json!({"a":"b","b":"c"}),
            json!({"a":null}),
            json!({"b":"c"}),
        ),
        (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
        (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
        (
            json!({"a":{"b":"c"}}),
            json!({"a":{"b":"d","c":null}}),
            json!({"a":{"b":"d"}}),
        ),
        (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
        (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
        (json!({"a":"b"}), json!(["c"]), json!(["c"])),
        (json!({"a":"foo"}), json!(null), json!(null)),
        (json!({"a":"foo"}), json!("bar"), json!("bar")),
        (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
        (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
        (
            json!({}),
            json!({"a":{"bb":{"ccc":null}}}),
            json!({"a":{"bb":{}}}),
        ),
    ]
}

/// Every example holds one level down, where any JSON value may stand.
#[tokio::test]
async fn appendix_a_examples_hold_below_the_root() {
    let (s, _d) = temp_store(StoreConfig::default());
    let n = ns("rfc");
    for (i, (original, patch, result)) in appendix_a().into_iter().enumerate() {
        if patch.is_null() {
            continue; // A null patch one level down removes the key: covered at the root below.
        }
        let d = id(&format!("case-{i}"));
        s.put(&n, &d, json!({"k": original}), None).await.unwrap();
        s.patch(&n, &d, json!({"k": patch}), None).await.unwrap();
        let got = s.get(&n, &d).unwrap().unwrap().content;
        assert_eq!(Value::Object(got), json!({"k": result}), "example {i}");
    }
}

/// At the root, the examples whose result is an object hold as written; a patch that would
/// make the root something else is refused, since a document is always an object.
#[tokio::test]
async fn appendix_a_examples_at_the_root() {
    let (s, _d) = temp_store(StoreConfig::default());
    let n = ns("rfc");
    for (i, (original, patch, result)) in appendix_a().into_iter().enumerate() {
        let d = id(&format!("root-{i}"));
        if original.is_object() {
            s.put(&n, &d, original.clone(), None).await.unwrap();
        }
        let outcome = s.patch(&n, &d, patch.clone(), None).await;
        if result.is_object() {
            outcome.unwrap();
            let got = s.get(&n, &d).unwrap().unwrap().content;
            assert_eq!(Value::Object(got), result, "example {i}");
        } else {
            assert!(
                matches!(outcome, Err(StoreError::Model(ModelError::NotAnObject(_)))),
                "example {i}: {outcome:?}"
            );
            if original.is_object() {
                let got = s.get(&n, &d).unwrap().unwrap().content;
                assert_eq!(Value::Object(got), original, "example {i} left unchanged");
            }
        }
    }
}
