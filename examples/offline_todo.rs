//! `cargo run --release -p tidesync-examples --example offline_todo`: see
//! [`tidesync_examples::offline_todo`] for what it shows.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tidesync_examples::offline_todo::run(&mut std::io::stdout()).await?;
    Ok(())
}
