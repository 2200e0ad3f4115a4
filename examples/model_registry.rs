//! `cargo run --release -p tidesync-examples --example model_registry`: see
//! [`tidesync_examples::model_registry`] for what it shows.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tidesync_examples::model_registry::run(&mut std::io::stdout()).await?;
    Ok(())
}
