//! What a person watching the job sees: a progress bar on a terminal (rows, rows/s, files,
//! bytes, an ETA from the source's row estimate), or one summary line every 30 seconds when
//! stderr is a log file or a container's log stream, where bars turn into noise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::metrics::Progress;

/// Shows progress until the returned handle is dropped (or aborted).
pub fn spawn(progress: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    if std::io::stderr().is_terminal() { tokio::spawn(bar(progress)) } else { tokio::spawn(lines(progress)) }
}

async fn bar(progress: Arc<Progress>) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {human_pos}/{human_len} rows, {per_sec}, ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let _clear = ClearOnDrop(bar.clone());
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let estimate = progress.estimated_rows.load(Ordering::Relaxed);
        let rows = progress.rows_read.load(Ordering::Relaxed);
        bar.set_length(estimate.max(rows));
        bar.set_position(rows);
        bar.set_message(format!(
            "| {} files, {}",
            progress.committed_files.load(Ordering::Relaxed),
            human_bytes(progress.committed_bytes.load(Ordering::Relaxed))
        ));
    }
}

struct ClearOnDrop(indicatif::ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

async fn lines(progress: Arc<Progress>) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.tick().await;
    loop {
        tick.tick().await;
        let rows = progress.rows_read.load(Ordering::Relaxed);
        let estimate = progress.estimated_rows.load(Ordering::Relaxed);
        let share = if estimate > 0 {
            format!(" of ~{} ({:.0}%)", group(estimate), rows as f64 * 100.0 / estimate as f64)
        } else {
            String::new()
        };
        tracing::info!(
            target: "bq2sftp::progress",
            rows,
            files = progress.committed_files.load(Ordering::Relaxed),
            bytes = progress.committed_bytes.load(Ordering::Relaxed),
            "progress: {} rows read{share}, {:.0} rows/s, {} files / {} committed",
            group(rows),
            rows as f64 / start.elapsed().as_secs_f64(),
            progress.committed_files.load(Ordering::Relaxed),
            human_bytes(progress.committed_bytes.load(Ordering::Relaxed))
        );
    }
}

/// `1234567` as `1,234,567`.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in binary units: `17.4 MiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}
