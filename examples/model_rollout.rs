//! `cargo run --release -p tidesync-examples --example model_rollout`: see
//! [`tidesync_examples::model_rollout`] for what it shows.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tidesync_examples::model_rollout::run(&mut std::io::stdout()).await?;
    Ok(())
}
