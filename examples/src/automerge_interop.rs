//! Automerge interop: a document built with plain `automerge` outside Tidesync is pushed
//! through the Automerge bytes endpoint of one edge, edited as JSON at another edge, then
//! pulled back as bytes from the first and loaded with plain `automerge` again: the
//! original history is intact and the remote edit is there.

use std::io::Write;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, ObjType, ReadDoc, ScalarValue, ROOT};
use serde_json::json;

use crate::local::{http, http_bytes, Local};

/// What the example ended with, for its test.
#[derive(Debug)]
pub struct InteropReport {
    /// The original document's heads, all present in the pulled-back document.
    pub original_heads_kept: bool,
    /// The text as plain automerge reads it at the end.
    pub text: String,
    /// The counter as plain automerge reads it at the end.
    pub counter: i64,
    /// The field set by the JSON edit, as plain automerge reads it.
    pub reviewed_by: Option<String>,
}

/// Runs the example, narrating to `out`.
pub async fn run(out: &mut dyn Write) -> Result<InteropReport> {
    // 1. Outside Tidesync: plain automerge, with types JSON lacks (text, counter).
    let mut doc = AutoCommit::new();
    let text = doc.put_object(ROOT, "text", ObjType::Text)?;
    doc.splice_text(&text, 0, 0, "Hello from plain automerge")?;
    doc.put(ROOT, "views", ScalarValue::counter(3))?;
    let tags = doc.put_object(ROOT, "tags", ObjType::List)?;
    doc.insert(&tags, 0, "draft")?;
    doc.commit();
    let original_heads = doc.get_heads();
    let bytes = doc.save();
    writeln!(
        out,
        "plain automerge: a document with text, a counter and a list ({} bytes)",
        bytes.len()
    )?;

    let local = Local::new("interop")?;
    let hub = local.hub("hub", &[]).await?;
    let e1 = local.edge("edge-1", &["*=rw"], &[hub.quic()]).await?;
    let e2 = local.edge("edge-2", &["*=rw"], &[hub.quic()]).await?;

    // 2. In through the bytes endpoint at edge-1.
    let url1 = format!("{}/v1/docs/notes/welcome", e1.api());
    let (status, _) = http_bytes("POST", &format!("{url1}/automerge"), Some(bytes)).await?;
    ensure!(status == 200, "POST automerge answered {status}");
    writeln!(
        out,
        "edge-1: POST /v1/docs/notes/welcome/automerge -> {status}"
    )?;

    // 3. Edited as JSON at edge-2 once it has arrived.
    let url2 = format!("{}/v1/docs/notes/welcome", e2.api());
    let started = std::time::Instant::now();
    let seen = loop {
        let (status, body) = http("GET", &url2, None).await?;
        if status == 200 {
            break body;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the document never reached edge-2"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    writeln!(out, "edge-2 reads it as JSON: {seen}")?;
    let (status, _) = http("PATCH", &url2, Some(json!({"reviewed_by": "edge-2"}))).await?;
    ensure!(status == 200, "PATCH answered {status}");
    writeln!(
        out,
        "edge-2: PATCH {{\"reviewed_by\":\"edge-2\"}} -> {status}"
    )?;

    // 4. Pulled back from edge-1 as bytes, loaded with plain automerge.
    let started = std::time::Instant::now();
    let pulled = loop {
        let (_, body) = http("GET", &url1, None).await?;
        if body.get("reviewed_by").is_some() {
            let (status, bytes) = http_bytes("GET", &format!("{url1}/automerge"), None).await?;
            ensure!(status == 200, "GET automerge answered {status}");
            break Automerge::load(&bytes)?;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the edit never reached edge-1"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let text_id = pulled.get(ROOT, "text")?.context("text field")?.1;
    let text = pulled.text(&text_id)?;
    let counter = match pulled.get(ROOT, "views")?.context("views field")?.0 {
        automerge::Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Counter(c) => i64::from(c),
            other => anyhow::bail!("views is no longer a counter: {other:?}"),
        },
        other => anyhow::bail!("views is not a scalar: {other:?}"),
    };
    // The document's strings are text (as JS Automerge makes them), so the JSON write
    // made its new string text too: what JS reads as a plain string.
    let reviewed_by = match pulled.get(ROOT, "reviewed_by")? {
        Some((automerge::Value::Object(automerge::ObjType::Text), id)) => Some(pulled.text(&id)?),
        Some((automerge::Value::Scalar(s), _)) => s.as_str().map(str::to_owned),
        _ => None,
    };
    let original_heads_kept = original_heads
        .iter()
        .all(|h| pulled.get_change_by_hash(h).is_some());
    writeln!(
        out,
        "edge-1: GET /v1/docs/notes/welcome/automerge, loaded with plain automerge:"
    )?;
    writeln!(
        out,
        "  text = {text:?} (still a text object), views = {counter} (still a counter)"
    )?;
    writeln!(
        out,
        "  reviewed_by = {reviewed_by:?}; original history kept: {original_heads_kept}"
    )?;

    e2.stop().await;
    e1.stop().await;
    hub.stop().await;
    Ok(InteropReport {
        original_heads_kept,
        text,
        counter,
        reviewed_by,
    })
}
