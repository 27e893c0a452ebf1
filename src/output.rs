//! Output helpers: human-readable sizes and durations, aligned tables, a point as
//! JSON, progress bars on a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use catalog::{Manifest, PointRef};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Prints rows as columns separated by two spaces, the header first.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Printed at once: a line at a time is a write each (stdout is line-buffered),
    // a thousand of them for a day of points.
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let start = out.len();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.truncate(start + out[start..].trim_end().len());
        out.push('\n');
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
    print!("{out}");
}

/// A spinner on stderr when it is a terminal and not quiet; hidden otherwise.
pub fn spinner(quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("valid template"));
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A bar of bytes on stderr (with files, rate and ETA) when it is a terminal and
/// not quiet; hidden otherwise. With no length set, it shows no ETA.
pub fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {wide_msg}",
        )
        .expect("valid template"),
    );
    pb
}

/// `90s` as `1m30s`.
pub fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

/// A point as `--json` shows it, with what its manifest says when it was read.
pub fn point_json(p: &PointRef, m: Option<&Manifest>) -> serde_json::Value {
    let mut v = json!({
        "source": p.source,
        "time": p.time.to_string(),
        "id": p.short_id(),
        "name": p.name,
    });
    if let Some(m) = m {
        v["host"] = json!(m.host);
        v["kind"] = json!(m.kind);
        v["path"] = json!(m.path);
        v["stats"] = serde_json::to_value(&m.stats).expect("stats serialize");
        v["skipped"] = serde_json::to_value(&m.skipped).expect("skipped serializes");
        if let Some(pg) = &m.pg {
            v["pg"] = serde_json::to_value(pg).expect("pg info serializes");
        }
    }
    v
}
