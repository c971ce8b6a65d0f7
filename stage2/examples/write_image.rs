//! Writes an image with the stage2 writer, for shell tests and benchmarks:
//!
//! ```text
//! write_image SOURCE TARGET SHA256 [SIZE]
//! ```
//!
//! SOURCE is an `http://` URL or a file; TARGET a block device or file. Prints the result
//! (`written BYTES bytes FORMAT in SECONDS s, MB/s RATE, resumes N`) or the error, exit 1.

use std::time::Duration;

use anyhow::{bail, Context};
use stage2::image::{write_image, HttpSource, RetryPolicy, WriteOptions};
use wire::orders::parse_sha256;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole chain of causes, for logs and shell tests.
            eprintln!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (source, target, sha256, size) = match args.as_slice() {
        [source, target, sha256] => (source, target, sha256, None),
        [source, target, sha256, size] => (source, target, sha256, Some(size)),
        _ => bail!("usage: write_image SOURCE TARGET SHA256 [SIZE]"),
    };
    let mut options =
        WriteOptions::new(parse_sha256(sha256).context("SHA256 must be 64 hex digits")?);
    options.expected_size = size
        .map(|s| s.parse::<u64>())
        .transpose()
        .context("SIZE must be a number of bytes")?;
    options.progress_interval = Duration::from_secs(2);
    let progress = |p: &stage2::image::Progress| {
        eprintln!(
            "progress: {} bytes, {:.1} MB/s{}",
            p.bytes_written,
            p.bytes_per_second as f64 / 1e6,
            p.percent().map(|pc| format!(", {pc}%")).unwrap_or_default()
        )
    };
    let report = if source.starts_with("http://") {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(200),
            ..RetryPolicy::default()
        };
        // Lazy: a failed first request also goes through write_image and wipes the target.
        write_image(
            HttpSource::new(source, policy),
            target.as_ref(),
            &options,
            progress,
        )
    } else {
        let file = std::fs::File::open(source).with_context(|| format!("opening {source}"))?;
        write_image(file, target.as_ref(), &options, progress)
    }
    .with_context(|| format!("writing {source} to {target}"))?;
    println!(
        "written {} bytes {} in {:.3} s, {:.1} MB/s",
        report.bytes,
        report.format,
        report.elapsed.as_secs_f64(),
        report.bytes as f64 / report.elapsed.as_secs_f64() / 1e6
    );
    Ok(())
}
