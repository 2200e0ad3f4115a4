//! Each example runs to completion and shows what it claims.

use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_converges_and_shows_the_conflict() {
    let mut out = Vec::new();
    let r = tidesync_examples::demo::run(&mut out).await.expect("demo");
    let text = String::from_utf8_lossy(&out);
    assert_eq!(r.content.len(), 4);
    assert!(r.content.iter().all(|c| *c == r.content[0]), "{text}");
    assert!(r.heads.iter().all(|h| *h == r.heads[0] && h.len() == 2));
    assert_eq!(
        r.content[0]["items"],
        json!({"bread": 1, "eggs": 12, "milk": 2})
    );
    for alts in &r.title_alternatives {
        assert_eq!(alts.len(), 2, "{text}");
        assert!(alts.contains(&json!("Weekend groceries")));
        assert!(alts.contains(&json!("Groceries (urgent)")));
    }
    assert!(text.contains("converge") && text.contains("edge-3"));
    assert!(r.took.as_secs() < 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_todo_merges_both_replicas() {
    let r = tidesync_examples::offline_todo::run(&mut Vec::new())
        .await
        .expect("offline_todo");
    assert_eq!(r.phone, r.laptop);
    let keys: Vec<&str> = r.phone.keys().map(String::as_str).collect();
    assert_eq!(keys, ["bike", "cake", "mail", "plants"]);
    assert_eq!(r.phone["plants"]["done"], true);
    assert_eq!(r.rename_conflict.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_registry_enforces_grants() {
    let r = tidesync_examples::model_registry::run(&mut Vec::new())
        .await
        .expect("model_registry");
    assert_eq!(r.model_at_edges.len(), 3);
    assert!(r.model_at_edges.iter().all(|m| m["rollout"] == 0.25));
    for ids in &r.health_at_hubs {
        assert_eq!(ids, &["infer-eu-1", "infer-eu-2", "infer-us-1"]);
    }
    assert_eq!(r.edge_write_to_models, 403);
    assert!(r.model_at_hubs_after.iter().all(|m| m["rollout"] == 0.25));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automerge_interop_round_trips() {
    let r = tidesync_examples::automerge_interop::run(&mut Vec::new())
        .await
        .expect("automerge_interop");
    assert!(r.original_heads_kept);
    assert_eq!(r.text, "Hello from plain automerge");
    assert_eq!(r.counter, 3);
    assert_eq!(r.reviewed_by.as_deref(), Some("edge-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_rollout_resumes_and_every_edge_verifies() {
    let mut out = Vec::new();
    let r = tidesync_examples::model_rollout::run(&mut out)
        .await
        .expect("model_rollout");
    let text = String::from_utf8_lossy(&out);
    assert_eq!(r.verified, [true, true, true], "{text}");
    assert!(r.stopped_at >= r.size / 2, "{text}");
    assert!(r.resumed >= r.stopped_at, "{text}");
    let missing = r.size - r.resumed;
    assert!(
        r.received_after_restart as f64 <= missing as f64 * 1.05,
        "{text}"
    );
}
