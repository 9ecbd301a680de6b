//! What the store measures about itself: log flushes and applies, and how long each waits
//! for the thread that runs it (on a lone write those wake-ups are a measurable part of its
//! latency; under load, the queue behind the work in progress).
//!
//! The figures are Prometheus metrics (the `prometheus-client` crate), kept per store (several
//! nodes may share one process in tests) and registered by the node that serves them. They
//! cost an uncontended lock or a few atomic operations per log group commit and per apply,
//! never an allocation, and nothing is recorded in the replicated state: metrics are local
//! and non-deterministic by nature.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Latency buckets for disk work: 50 µs to ~1.6 s, doubling.
fn disk_seconds() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 16))
}

/// Latency buckets for waiting on another thread (a wake-up, or work queued ahead): 5 µs to
/// ~80 ms, doubling.
fn wait_seconds() -> Histogram {
    Histogram::new(exponential_buckets(5e-6, 2.0, 15))
}

/// Count buckets for "how many per batch": 1 to 1,024, doubling.
pub fn batch_sizes() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// The store's metrics. Cheap to share (`Arc`); every field is updated atomically.
#[derive(Debug)]
pub struct StorageMetrics {
    /// Duration of one durable log commit (one fsync for a group of appends).
    pub log_flush_seconds: Histogram,
    /// Appends (openraft append calls) one durable log commit covered.
    pub log_flush_appends: Histogram,
    /// From an append handed to the log writer thread to the start of the commit that
    /// covers it: the thread's wake-up, or the commit in progress ahead of it.
    pub log_queue_seconds: Histogram,
    /// Duration of one state-machine apply (one transaction, one or more entries), as the
    /// state machine task sees it: from handing it to the blocking pool to its result, so
    /// the pool's wake-up ([`Self::apply_queue_seconds`]) included.
    pub apply_seconds: Histogram,
    /// From an apply handed to the blocking pool to a pool thread starting it.
    pub apply_queue_seconds: Histogram,
    /// Log entries applied to the state machine.
    pub applied_entries: Counter,
    /// Client commands applied (the commands inside applied entries).
    pub applied_commands: Counter,
    /// Durable log commits and their total duration, for means without a scrape.
    log_flushes: AtomicU64,
    log_flush_micros: AtomicU64,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        StorageMetrics {
            log_flush_seconds: disk_seconds(),
            log_flush_appends: batch_sizes(),
            log_queue_seconds: wait_seconds(),
            apply_seconds: disk_seconds(),
            apply_queue_seconds: wait_seconds(),
            applied_entries: Counter::default(),
            applied_commands: Counter::default(),
            log_flushes: AtomicU64::new(0),
            log_flush_micros: AtomicU64::new(0),
        }
    }
}

impl StorageMetrics {
    /// Records one durable log commit of `appends` appends that took `took`.
    pub fn log_flushed(&self, appends: usize, took: std::time::Duration) {
        self.log_flush_seconds.observe(took.as_secs_f64());
        self.log_flush_appends.observe(appends as f64);
        self.log_flushes.fetch_add(1, Ordering::Relaxed);
        self.log_flush_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Records how long one append waited for the log writer to start its commit.
    pub fn log_queued(&self, waited: std::time::Duration) {
        self.log_queue_seconds.observe(waited.as_secs_f64());
    }

    /// Durable log commits so far and their mean duration in milliseconds.
    pub fn log_flush_mean_ms(&self) -> (u64, f64) {
        let n = self.log_flushes.load(Ordering::Relaxed);
        let micros = self.log_flush_micros.load(Ordering::Relaxed);
        (
            n,
            if n == 0 {
                0.0
            } else {
                micros as f64 / n as f64 / 1000.0
            },
        )
    }

    /// Registers every series under `registry` (the caller chooses the prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "raft_log_flush",
            "Duration of one durable Raft log commit (one fsync covering a group of appends)",
            Unit::Seconds,
            self.log_flush_seconds.clone(),
        );
        registry.register(
            "raft_log_flush_appends",
            "Appends one durable Raft log commit covered (group commit size)",
            self.log_flush_appends.clone(),
        );
        registry.register_with_unit(
            "raft_log_queue",
            "Time an append waits for the log writer thread to start the commit covering it \
             (its wake-up, or a commit in progress)",
            Unit::Seconds,
            self.log_queue_seconds.clone(),
        );
        registry.register_with_unit(
            "state_machine_apply",
            "Duration of one state machine apply (one transaction), from handing it to the \
             blocking pool to its result",
            Unit::Seconds,
            self.apply_seconds.clone(),
        );
        registry.register_with_unit(
            "state_machine_apply_queue",
            "Time an apply waits for a blocking-pool thread to start it",
            Unit::Seconds,
            self.apply_queue_seconds.clone(),
        );
        registry.register(
            "state_machine_applied_entries",
            "Raft log entries applied to the state machine",
            self.applied_entries.clone(),
        );
        registry.register(
            "state_machine_applied_commands",
            "Client commands applied to the state machine",
            self.applied_commands.clone(),
        );
    }
}
