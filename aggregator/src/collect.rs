//! `collect`: consume result events from a results queue, count each task once, and record one
//! run per `run_id` — for fleets started elsewhere (compose, Kubernetes, by hand).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use cropfleet::queue::{self, ConsumerOptions};
use cropfleet::stats::{RunCollector, RunRecord};
use cropfleet::task::ResultEvent;

#[derive(Debug, clap::Args)]
pub struct CollectArgs {
    /// Results queue URI.
    #[arg(long, env = "CROPFLEET_RESULTS", default_value = "spool:cropfleet-data/results")]
    pub results: String,
    /// Folder for runs.csv, runs.json and the pictures.
    #[arg(long, env = "CROPFLEET_OUT", default_value = "results/collect")]
    pub out: PathBuf,
    /// Stop after this many distinct tasks (all runs together); 0: no count, stop when idle.
    #[arg(long, env = "CROPFLEET_EXPECT", default_value_t = 0)]
    pub expect: u64,
    /// Stop when no event arrived for this many seconds, once at least one did.
    #[arg(long, env = "CROPFLEET_IDLE_SECS", default_value_t = 15.0)]
    pub idle_secs: f64,
    /// Worker processes of the fleet (recorded in the table; the events carry threads).
    #[arg(long, env = "CROPFLEET_PROCESSES", default_value_t = 1)]
    pub processes: u32,
    /// Label of these runs in the table.
    #[arg(long, env = "CROPFLEET_LABEL", default_value = "collect")]
    pub label: String,
}

pub async fn run(a: CollectArgs) -> anyhow::Result<()> {
    let q =
        queue::open(&a.results).await.with_context(|| format!("opening {}", cropfleet::secret::redact(&a.results)))?;
    let backend = q.backend();
    let mut consumer = q.consumer(ConsumerOptions { prefetch: 256, ..Default::default() }).await?;
    let mut runs: BTreeMap<String, RunCollector> = BTreeMap::new();
    let mut last_event: Option<Instant> = None;
    let mut last_line = Instant::now();
    let idle = Duration::from_secs_f64(a.idle_secs);
    let mut shutdown = std::pin::pin!(tokio::signal::ctrl_c());
    let expect = (a.expect > 0).then_some(a.expect);
    loop {
        let total: u64 = runs.values().map(|c| c.len() as u64).sum();
        if expect.is_some_and(|n| total >= n) || last_event.is_some_and(|t| t.elapsed() >= idle) {
            break;
        }
        let next = tokio::select! {
            _ = &mut shutdown => break,
            n = consumer.next(Duration::from_millis(250)) => n,
        };
        match next {
            Ok(Some(d)) => {
                match ResultEvent::parse(&d.payload) {
                    Ok(ev) => {
                        runs.entry(ev.run_id.clone().unwrap_or_else(|| "unnamed".into())).or_default().add(ev);
                        d.acker.ack().await?;
                    }
                    Err(e) => d.acker.dead_letter(&format!("not a result event: {e}")).await?,
                }
                last_event = Some(Instant::now());
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "receiving results failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if last_line.elapsed() >= Duration::from_secs(2) {
            for (run, c) in &runs {
                let eta = expect.map(|n| {
                    let left = n.saturating_sub(c.len() as u64) as f64;
                    if c.rate() > 0.0 {
                        format!(", eta {:.0}s", left / c.rate())
                    } else {
                        String::new()
                    }
                });
                eprintln!("{run}: {} tasks, {:.2} tasks/s{}", c.len(), c.rate(), eta.unwrap_or_default());
            }
            last_line = Instant::now();
        }
    }
    let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let records: Vec<RunRecord> = runs
        .iter()
        .map(|(run, c)| {
            c.record(
                RunRecord {
                    label: format!("{}:{run}", a.label),
                    backend: backend.into(),
                    storage: "unknown".into(),
                    mode: "decode".into(),
                    processes: a.processes,
                    cores,
                    // The fleet ran elsewhere: this machine is not recorded as its machine.
                    started_utc: cropfleet::util::iso8601_utc(c.started_ms()),
                    build: crate::this_build(),
                    queue_uri: cropfleet::secret::redact(&a.results),
                    ..Default::default()
                },
                0.0,
            )
        })
        .collect();
    crate::write_outputs(&records, &a.out, "cropfleet throughput (collected)")
}
