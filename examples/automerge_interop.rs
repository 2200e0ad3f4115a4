//! `cargo run --release -p tidesync-examples --example automerge_interop`: see
//! [`tidesync_examples::automerge_interop`] for what it shows.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tidesync_examples::automerge_interop::run(&mut std::io::stdout()).await?;
    Ok(())
}
