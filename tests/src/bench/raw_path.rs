//! The raw limit of the live path A → H → B: the least work any Automerge-over-QUIC-into-
//! redb sync can do per write, step by step, with none of Tidesync's code.
//!
//! 1. `change_commit`: one single-field change with plain `automerge`, its bytes stored
//!    with one `Durability::Immediate` redb commit (the write at A).
//! 2. `one_way`: half the round trip of the change's bytes over one plain quinn stream
//!    (TLS 1.3, ring) on 127.0.0.1 (each hop).
//! 3. `apply_commit`: `apply_changes` of those bytes into a replica document and one
//!    durable redb commit (the hub, then B).
//!
//! limit = change_commit + 2 × (one_way + apply_commit); the direct path A → H is
//! change_commit + one_way + apply_commit. Each step is the median of `samples`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use redb::{Database, Durability, TableDefinition};
use serde_json::{json, Value};

use super::{micros, percentile};

const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");

/// Measures each step `samples` times and returns the medians and their sums.
pub async fn measure(samples: usize) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let db_a = Database::builder().create(dir.path().join("a.redb"))?;
    let db_h = Database::builder().create(dir.path().join("h.redb"))?;
    let mut doc_a = Automerge::new();
    let mut doc_h = Automerge::new();

    let mut change_commit = Vec::with_capacity(samples);
    let mut apply_commit = Vec::with_capacity(samples);
    let mut changes = Vec::with_capacity(samples);
    for k in 0..samples as u64 {
        let started = Instant::now();
        let mut tx = doc_a.transaction();
        tx.put(ROOT, "n", k as i64)?;
        tx.commit();
        let bytes = doc_a
            .get_last_local_change()
            .context("a change was made")?
            .raw_bytes()
            .to_vec();
        store(&db_a, k, &bytes)?;
        change_commit.push(started.elapsed());

        let started = Instant::now();
        let change = automerge::Change::from_bytes(bytes.clone())?;
        doc_h.apply_changes([change])?;
        store(&db_h, k, &bytes)?;
        apply_commit.push(started.elapsed());
        changes.push(bytes);
    }
    let mut one_way = quic_one_way(&changes).await?;

    let cc = percentile(&mut change_commit, 50.0);
    let ac = percentile(&mut apply_commit, 50.0);
    let ow = percentile(&mut one_way, 50.0);
    Ok(json!({
        "limit_us": micros(cc + 2 * (ow + ac)),
        "direct_limit_us": micros(cc + ow + ac),
        "steps_us": {
            "change_commit": micros(cc),
            "one_way": micros(ow),
            "apply_commit": micros(ac),
        },
    }))
}

fn store(db: &Database, key: u64, bytes: &[u8]) -> Result<()> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    {
        let mut table = tx.open_table(CHANGES)?;
        table.insert(key, bytes)?;
    }
    tx.commit()?;
    Ok(())
}

/// Plain quinn on loopback, the raw limit's transport: a server endpoint with a
/// self-signed certificate for `localhost`, and a client endpoint that trusts it.
pub fn loopback_endpoints() -> Result<(quinn::Endpoint, quinn::Endpoint)> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert_der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let server_cfg = quinn::ServerConfig::with_single_cert(vec![cert_der.clone()], key)?;
    let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse()?)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der)?;
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(quinn::ClientConfig::with_root_certificates(Arc::new(
        roots,
    ))?);
    Ok((server, client))
}

/// Half the round trip of each message over one long-lived bidirectional quinn stream.
async fn quic_one_way(messages: &[Vec<u8>]) -> Result<Vec<Duration>> {
    let (server, client) = loopback_endpoints()?;
    let addr = server.local_addr()?;

    let echo = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut len = [0u8; 4];
        let mut buf = Vec::new();
        while recv.read_exact(&mut len).await.is_ok() {
            buf.resize(u32::from_be_bytes(len) as usize, 0);
            recv.read_exact(&mut buf).await?;
            send.write_all(&len).await?;
            send.write_all(&buf).await?;
        }
        anyhow::Ok(())
    });

    let conn = client.connect(addr, "localhost")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut samples = Vec::with_capacity(messages.len());
    let mut back = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let started = Instant::now();
        let len = (m.len() as u32).to_be_bytes();
        send.write_all(&len).await?;
        send.write_all(m).await?;
        let mut got = [0u8; 4];
        recv.read_exact(&mut got).await?;
        back.resize(m.len(), 0);
        recv.read_exact(&mut back).await?;
        // The first exchanges open the stream at the far side; skip them.
        if i >= 5 {
            samples.push(started.elapsed() / 2);
        }
    }
    send.finish()?;
    let _ = send.stopped().await;
    conn.close(0u32.into(), b"done");
    echo.abort();
    Ok(samples)
}

/// The raw limit of fanout: the hub's durable commit, then `edges` durable commits of the
/// same bytes, one per redb file, all at once from one thread each (as `edges` nodes in
/// one process commit). Returns the median and 99th percentile, in ms, of `rounds` rounds.
pub fn fanout_commits(edges: usize, rounds: usize) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let hub = Database::builder().create(dir.path().join("hub.redb"))?;
    let dbs: Vec<Arc<Database>> = (0..edges)
        .map(|i| {
            Ok(Arc::new(
                Database::builder().create(dir.path().join(format!("e{i}.redb")))?,
            ))
        })
        .collect::<Result<_>>()?;
    let bytes = vec![7u8; 120];
    let mut samples = Vec::with_capacity(rounds);
    for k in 0..rounds as u64 {
        let started = Instant::now();
        store(&hub, k, &bytes)?;
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = dbs
                .iter()
                .map(|db| s.spawn(|| store(db, k, &bytes)))
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a commit thread panicked"))??;
            }
            Ok(())
        })?;
        samples.push(started.elapsed());
    }
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    Ok((
        ms(percentile(&mut samples, 50.0)),
        ms(percentile(&mut samples, 99.0)),
    ))
}
