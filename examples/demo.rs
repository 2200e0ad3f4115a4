//! `cargo run --release -p tidesync-examples --example demo`: see
//! [`tidesync_examples::demo`] for what it shows.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tidesync_examples::demo::run(&mut std::io::stdout()).await?;
    Ok(())
}
