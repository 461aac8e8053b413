//! Metric names and descriptions, in one place so the worker, the docs and the tests agree.
//! Recording goes through the `metrics` facade; the worker binary installs the Prometheus
//! exporter. Labels are low-cardinality (outcome, stage), never task ids.

/// Tasks settled, by `outcome` = `ok` | `dead_lettered` | `retried`.
pub const TASKS: &str = "cropfleet_tasks_total";
/// Crops stored.
pub const CROPS: &str = "cropfleet_crops_total";
/// Encoded bytes stored.
pub const BYTES: &str = "cropfleet_bytes_written_total";
/// Stage latency, seconds, by `stage` = `queue_wait` | `download` | `decode` | `crop_encode` | `upload` | `total`.
pub const STAGE_SECONDS: &str = "cropfleet_stage_seconds";
/// Tasks currently held by this worker.
pub const IN_FLIGHT: &str = "cropfleet_tasks_in_flight";
/// CPU pool threads currently decoding or encoding.
pub const CPU_BUSY: &str = "cropfleet_cpu_busy_threads";
/// Uploads currently running.
pub const UPLOADS_IN_FLIGHT: &str = "cropfleet_uploads_in_flight";
/// Queue reconnects after a broker failure.
pub const RECONNECTS: &str = "cropfleet_reconnects_total";

/// Histogram buckets (seconds) for stage latencies: 1 ms to 60 s.
pub const STAGE_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Register descriptions with the installed recorder (call after installing it).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(TASKS, "Tasks settled, by outcome (ok, dead_lettered, retried)");
    describe_counter!(CROPS, "Crops stored");
    describe_counter!(BYTES, Unit::Bytes, "Encoded crop bytes stored");
    describe_histogram!(STAGE_SECONDS, Unit::Seconds, "Task stage latency by stage");
    describe_gauge!(IN_FLIGHT, "Tasks currently held by this worker");
    describe_gauge!(CPU_BUSY, "CPU pool threads busy decoding or encoding");
    describe_gauge!(UPLOADS_IN_FLIGHT, "Uploads in progress");
    describe_counter!(RECONNECTS, "Queue reconnects after a broker failure");
}
