//! A latency histogram for Prometheus: fixed buckets, one atomic add per observation.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets for store and upstream waits, in seconds (finer below 1 ms).
pub(crate) const FINE: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Observations counted per bucket (each in the one it falls in; the exposition accumulates).
#[derive(Debug)]
pub(crate) struct Histogram {
    /// Upper bounds, in seconds, ascending.
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(FINE)
    }
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: Duration) {
        // The count first: a scrape reading the buckets after it never sees `+Inf` below them.
        self.count.fetch_add(1, Ordering::Relaxed);
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The `_bucket`, `_sum` and `_count` samples of `name`, with `labels` (`k="v"` pairs,
    /// already escaped, or empty) on each.
    pub(crate) fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_accumulate_and_the_rest_goes_to_inf() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(9));
        let mut out = String::new();
        h.render(&mut out, "x", "u=\"a\"");
        assert!(out.contains("x_bucket{u=\"a\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{u=\"a\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{u=\"a\",le=\"5\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{u=\"a\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{u=\"a\"} 3\n"), "{out}");
        let mut out = String::new();
        h.render(&mut out, "y", "");
        assert!(
            out.contains("y_bucket{le=\"+Inf\"} 3\ny_sum 9.00305\ny_count 3\n"),
            "{out}"
        );
    }
}
