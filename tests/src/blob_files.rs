//! Large test files for blob tests and the `artifact` benchmark: reproducible noise
//! (incompressible, no two chunk groups alike), a telemetry dataset (CSV, as a fleet's
//! readings are exported) and a streaming comparison.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::Result;

/// Writes `size` bytes of noise from `seed` to `path`, streaming.
pub fn noise_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut left = size;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Whether two files hold the same bytes, compared a MiB at a time.
pub fn same_files(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// `size` bytes of a CSV dataset of device readings from `seed`: a header, then one row a
/// reading (time, device, metric, value, status), as an export of a fleet's telemetry
/// is. Values and devices vary from row to row; what repeats is what repeats in such
/// files (the column set, metric names, the time's prefix).
pub fn telemetry_csv(size: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    // Writing into a Vec does not fail.
    let _ = write_telemetry_csv(&mut out, size as u64, seed);
    out
}

/// [`telemetry_csv`] of `size` bytes into a file at `path`, streaming.
pub fn telemetry_csv_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    write_telemetry_csv(&mut f, size, seed)?;
    f.flush()?;
    Ok(())
}

fn write_telemetry_csv(out: &mut impl Write, size: u64, seed: u64) -> std::io::Result<()> {
    const METRICS: &[&str] = &[
        "temperature_c",
        "humidity_pct",
        "inference_ms",
        "gpu_util_pct",
        "vibration_mm_s",
        "power_w",
        "queue_depth",
    ];
    const STATUS: &[&str] = &["ok", "ok", "ok", "ok", "warn", "degraded"];
    let mut rng = crate::Rng::new(seed);
    let mut row = b"timestamp,device,metric,value,status\n".to_vec();
    let mut left = size;
    let mut t = 1_796_000_000u64;
    while left > 0 {
        let n = left.min(row.len() as u64);
        out.write_all(&row[..n as usize])?;
        left -= n;
        t += rng.range(1, 20);
        let (day, secs) = (t / 86_400, t % 86_400);
        row = format!(
            "2026-11-{:02}T{:02}:{:02}:{:02}Z,edge-{:04},{},{}.{:02},{}\n",
            day % 30 + 1,
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            rng.range(0, 5000),
            METRICS[rng.range(0, METRICS.len() as u64) as usize],
            rng.range(0, 1000),
            rng.range(0, 100),
            STATUS[rng.range(0, STATUS.len() as u64) as usize],
        )
        .into_bytes();
    }
    Ok(())
}
