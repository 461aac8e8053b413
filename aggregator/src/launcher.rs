//! How `sweep` brings up the fleet of one configuration.
//!
//! - `local` (default): `sweep` spawns `cropfleet-worker` processes itself (see `sweep.rs`).
//! - `command`: the fleet runs elsewhere — docker compose, Kubernetes, or anything a shell can
//!   drive. Before each configuration `sweep` runs `--scale-cmd` to bring the fleet to P workers
//!   × T threads, and after it `--stop-cmd` to stop it (and wait until it has stopped). The fleet
//!   consumes the one task queue `--queue` and publishes to `--results`, the same for every
//!   configuration; `sweep` tells the runs apart by run id. Everything else — the workload, the
//!   enqueueing, the collection of result events, the records and the picture — is the same code
//!   path as the local sweep.
//!
//! With `--cpu-cmd`, `sweep` also asks the fleet how much CPU it used: the template runs once the
//! configuration's tasks are done, before `--stop-cmd`, and prints the CPU-seconds the workers
//! have used since they were (re)started (docker compose: the containers' cgroup counters);
//! the record's CPU per task is that over the tasks.
//!
//! Templates are run with `sh -c`. Placeholders `{processes}`, `{threads}`, `{prefetch}`,
//! `{upload_concurrency}`, `{queue}`, `{results}`, `{tag}`, `{run_id}` are replaced by their
//! values (unquoted: use the environment variables for values with shell characters), and the
//! same values are in the command's environment as `CROPFLEET_PROCESSES`, `CROPFLEET_THREADS`,
//! `CROPFLEET_PREFETCH`, `CROPFLEET_UPLOAD_CONCURRENCY`, `CROPFLEET_QUEUE`, `CROPFLEET_RESULTS`,
//! `CROPFLEET_SWEEP_TAG` and `CROPFLEET_RUN_ID`, so `docker compose` can interpolate
//! `${CROPFLEET_THREADS}` into the worker's environment.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use cropfleet::secret::redact;

/// Who starts the workers of each configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LauncherKind {
    /// Spawn cropfleet-worker processes on this machine.
    #[default]
    Local,
    /// Run --scale-cmd / --stop-cmd shell templates against an external fleet.
    Command,
}

/// Flags of the fleet launcher (flattened into `sweep`).
#[derive(Debug, Clone, clap::Args)]
pub struct LauncherArgs {
    /// Who starts each configuration's workers: `local` spawns cropfleet-worker processes here;
    /// `command` runs --scale-cmd and --stop-cmd against a fleet consuming --queue (used as is).
    #[arg(long, env = "CROPFLEET_LAUNCHER", value_enum, default_value_t = LauncherKind::Local)]
    pub launcher: LauncherKind,
    /// `command` launcher: shell template that brings the fleet to one configuration, e.g.
    /// 'docker compose up -d --scale worker={processes} worker' (CROPFLEET_THREADS={threads} is
    /// in its environment). Placeholders: {processes} {threads} {prefetch} {upload_concurrency}
    /// {queue} {results} {tag} {run_id}.
    #[arg(long, env = "CROPFLEET_SCALE_CMD")]
    pub scale_cmd: Option<String>,
    /// `command` launcher: shell template run after each configuration (also after a failure)
    /// that stops the fleet and returns once it has stopped, e.g. 'docker compose stop worker'.
    #[arg(long, env = "CROPFLEET_STOP_CMD")]
    pub stop_cmd: Option<String>,
    /// `command` launcher: shell template printing the CPU-seconds the fleet's workers used since
    /// they were (re)started by --scale-cmd (its last line of output; run before --stop-cmd), for
    /// the CPU per task column [default: not measured, 0]. Same placeholders.
    #[arg(long, env = "CROPFLEET_CPU_CMD")]
    pub cpu_cmd: Option<String>,
    /// `command` launcher: the results queue the fleet publishes to (required there).
    #[arg(long, env = "CROPFLEET_RESULTS")]
    pub results: Option<String>,
    /// Output prefix the workers write crops under, as {output}/{tag}/… (e.g. gs://bucket/sweep,
    /// for either launcher) [default: the work folder, which an external fleet must see at the
    /// same path].
    #[arg(long, env = "CROPFLEET_OUTPUT")]
    pub output: Option<String>,
    /// `command` launcher: CPU cores the fleet may use, for tasks/s per core [default: this machine's].
    #[arg(long, env = "CROPFLEET_FLEET_CORES")]
    pub fleet_cores: Option<u32>,
    /// `command` launcher: seconds --scale-cmd or --stop-cmd may run before it is killed.
    #[arg(long, env = "CROPFLEET_CMD_TIMEOUT", default_value_t = 900.0)]
    pub cmd_timeout: f64,
}

/// The values of one configuration handed to the templates.
#[derive(Debug, Clone)]
pub struct Scale<'a> {
    pub processes: u32,
    pub threads: u32,
    pub prefetch: u32,
    pub upload_concurrency: u32,
    pub queue: &'a str,
    pub results: &'a str,
    pub tag: &'a str,
    pub run_id: &'a str,
}

impl Scale<'_> {
    fn vars(&self) -> Vec<(&'static str, &'static str, String)> {
        vec![
            ("{processes}", "CROPFLEET_PROCESSES", self.processes.to_string()),
            ("{threads}", "CROPFLEET_THREADS", self.threads.to_string()),
            ("{prefetch}", "CROPFLEET_PREFETCH", self.prefetch.to_string()),
            ("{upload_concurrency}", "CROPFLEET_UPLOAD_CONCURRENCY", self.upload_concurrency.to_string()),
            ("{queue}", "CROPFLEET_QUEUE", self.queue.to_string()),
            ("{results}", "CROPFLEET_RESULTS", self.results.to_string()),
            ("{tag}", "CROPFLEET_SWEEP_TAG", self.tag.to_string()),
            ("{run_id}", "CROPFLEET_RUN_ID", self.run_id.to_string()),
        ]
    }
}

impl LauncherArgs {
    pub fn is_local(&self) -> bool {
        self.launcher == LauncherKind::Local
    }

    /// Check the flags before anything starts; `queue` is the sweep's --queue.
    pub fn validate(&self, queue: Option<&str>) -> anyhow::Result<()> {
        if self.is_local() {
            for (flag, set) in [
                ("--scale-cmd", self.scale_cmd.is_some()),
                ("--stop-cmd", self.stop_cmd.is_some()),
                ("--cpu-cmd", self.cpu_cmd.is_some()),
                ("--results", self.results.is_some()),
                ("--fleet-cores", self.fleet_cores.is_some()),
            ] {
                if set {
                    bail!("{flag} belongs to --launcher command; the local launcher derives it itself");
                }
            }
            return Ok(());
        }
        let missing: Vec<&str> = [
            ("--scale-cmd", self.scale_cmd.is_none()),
            ("--stop-cmd", self.stop_cmd.is_none()),
            ("--queue", queue.is_none()),
            ("--results", self.results.is_none()),
        ]
        .into_iter()
        .filter_map(|(f, m)| m.then_some(f))
        .collect();
        if !missing.is_empty() {
            bail!("--launcher command needs {}", missing.join(", "));
        }
        if self.fleet_cores == Some(0) || self.cmd_timeout <= 0.0 {
            bail!("--fleet-cores and --cmd-timeout must be positive");
        }
        Ok(())
    }

    /// The fixed (tasks, results) queues of an external fleet; `None` for the local launcher,
    /// which derives fresh queues per configuration.
    pub fn fixed_queues(&self, queue: Option<&str>) -> Option<(String, String)> {
        match (self.launcher, queue, &self.results) {
            (LauncherKind::Command, Some(q), Some(r)) => Some((q.to_string(), r.clone())),
            _ => None,
        }
    }

    /// Output prefix of one configuration when --output is given.
    pub fn output_for(&self, tag: &str) -> Option<String> {
        self.output.as_ref().map(|o| format!("{}/{tag}", o.trim_end_matches('/')))
    }

    /// Storage kind for the table when it is not the local work folder.
    pub fn storage(&self) -> Option<String> {
        let o = self.output.as_deref()?;
        let scheme = o.split_once("://").map(|(s, _)| s)?;
        Some(if scheme == "gs" { "gcs".into() } else { scheme.to_string() })
    }

    /// Cores the fleet may use, when given.
    pub fn cores(&self) -> Option<u32> {
        self.fleet_cores
    }

    /// Bring the fleet to this configuration. `None` for the local launcher (the sweep spawns
    /// the workers itself). On failure the stop command has already run.
    pub async fn scale(&self, s: &Scale<'_>) -> anyhow::Result<Option<External>> {
        let (Some(scale), Some(stop)) = (&self.scale_cmd, &self.stop_cmd) else {
            return Ok(None);
        };
        if self.is_local() {
            return Ok(None);
        }
        let timeout = Duration::from_secs_f64(self.cmd_timeout);
        let vars = s.vars();
        let ext =
            External { stop: render(stop, &vars), cpu: self.cpu_cmd.as_ref().map(|c| render(c, &vars)), vars, timeout };
        if let Err(e) = run_template("scale", &render(scale, &ext.vars), &ext.vars, timeout).await {
            if let Err(stop_err) = ext.stop_now().await {
                eprintln!("sweep: after the failed scale command, the stop command failed too: {stop_err:#}");
            }
            return Err(e);
        }
        Ok(Some(ext))
    }
}

/// A running external fleet of one configuration.
#[derive(Debug)]
pub struct External {
    stop: String,
    cpu: Option<String>,
    vars: Vec<(&'static str, &'static str, String)>,
    timeout: Duration,
}

impl External {
    /// CPU-seconds the fleet used, from --cpu-cmd; 0 without one or when it fails (with a
    /// warning: the run itself is still valid).
    pub async fn cpu_seconds(&self) -> f64 {
        let Some(cmd) = &self.cpu else { return 0.0 };
        match capture_template("cpu", cmd, &self.vars, self.timeout).await {
            Ok(out) => match out.lines().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().parse::<f64>()) {
                Some(Ok(v)) if v.is_finite() && v >= 0.0 => v,
                _ => {
                    eprintln!("sweep: the cpu command printed no CPU-seconds on its last line: {out:?}");
                    0.0
                }
            },
            Err(e) => {
                eprintln!("sweep: {e:#}");
                0.0
            }
        }
    }

    /// Run the stop command (it returns once the fleet has stopped).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop_now().await
    }

    async fn stop_now(&self) -> anyhow::Result<()> {
        run_template("stop", &self.stop, &self.vars, self.timeout).await
    }
}

/// Replace every known placeholder.
pub fn render(template: &str, vars: &[(&'static str, &'static str, String)]) -> String {
    vars.iter().fold(template.to_string(), |t, (ph, _, v)| t.replace(ph, v))
}

/// A rendered template as it may be shown: every credential in a value masked (it runs with the
/// values as they are).
fn shown(cmd: &str, vars: &[(&'static str, &'static str, String)]) -> String {
    vars.iter().fold(cmd.to_string(), |shown, (_, _, v)| shown.replace(v.as_str(), &redact(v)))
}

/// Run one rendered template with `sh -c` within `timeout` and return its standard output
/// (standard error passed through). Unlike [`run_template`] it waits for the output to close, so
/// the template must not leave background processes holding it.
async fn capture_template(
    what: &str,
    cmd: &str,
    vars: &[(&'static str, &'static str, String)],
    timeout: Duration,
) -> anyhow::Result<String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(vars.iter().map(|(_, k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {what} command"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.with_context(|| format!("waiting for the {what} command"))?;
            if !out.status.success() {
                bail!("the {what} command failed ({}): {}", out.status, shown(cmd, vars));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Err(_) => bail!("the {what} command did not finish within {:.0}s: {}", timeout.as_secs_f64(), shown(cmd, vars)),
    }
}

/// Run one rendered template with `sh -c`, output passed through, within `timeout`.
async fn run_template(
    what: &str,
    cmd: &str,
    vars: &[(&'static str, &'static str, String)],
    timeout: Duration,
) -> anyhow::Result<()> {
    let shown = shown(cmd, vars);
    eprintln!("sweep: {what}: {shown}");
    // Output is inherited, not captured: a template that starts background processes must not
    // make us wait for them to close a pipe.
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(vars.iter().map(|(_, k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        // Its own process group, so a timeout ends everything the template started.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {what} command"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            let status = status.with_context(|| format!("waiting for the {what} command"))?;
            if !status.success() {
                bail!("the {what} command failed ({status}): {shown}");
            }
            Ok(())
        }
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: signalling the process group we created for this child.
                unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            }
            let _ = child.kill().await;
            bail!("the {what} command did not finish within {:.0}s: {shown}", timeout.as_secs_f64())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scale() -> Scale<'static> {
        Scale {
            processes: 3,
            threads: 2,
            prefetch: 8,
            upload_concurrency: 16,
            queue: "amqp://u:p@h:5672/%2f?queue=crops",
            results: "amqp://u:p@h:5672/%2f?queue=crops.results",
            tag: "p3t2",
            run_id: "sweep-1-p3t2",
        }
    }

    #[test]
    fn placeholders_are_replaced_and_others_kept() {
        let s = render("up --scale worker={processes} t={threads} {tag} ${HOME} {unknown}", &scale().vars());
        assert_eq!(s, "up --scale worker=3 t=2 p3t2 ${HOME} {unknown}");
    }

    #[tokio::test]
    async fn templates_see_the_values_in_their_environment() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("env");
        let a = LauncherArgs {
            launcher: LauncherKind::Command,
            scale_cmd: Some(format!(
                "echo \"$CROPFLEET_PROCESSES $CROPFLEET_THREADS $CROPFLEET_QUEUE {{upload_concurrency}}\" > {}",
                f.display()
            )),
            stop_cmd: Some(format!("echo stopped {{tag}} >> {}", f.display())),
            cpu_cmd: Some(format!("echo cpu {{tag}} >> {}; echo noise; echo $CROPFLEET_THREADS.5", f.display())),
            results: Some("spool:/r".into()),
            output: Some("gs://b/sweep/".into()),
            fleet_cores: None,
            cmd_timeout: 10.0,
        };
        a.validate(Some("spool:/q")).unwrap();
        assert_eq!(a.output_for("p3t2").as_deref(), Some("gs://b/sweep/p3t2"));
        assert_eq!(a.storage().as_deref(), Some("gcs"));
        let ext = a.scale(&scale()).await.unwrap().expect("external fleet");
        assert_eq!(ext.cpu_seconds().await, 2.5, "the last line of the cpu command");
        ext.stop().await.unwrap();
        let got = std::fs::read_to_string(&f).unwrap();
        assert_eq!(got, "3 2 amqp://u:p@h:5672/%2f?queue=crops 16\ncpu p3t2\nstopped p3t2\n");
    }

    #[tokio::test]
    async fn failed_scale_runs_stop_and_reports_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("stopped");
        let a = LauncherArgs {
            launcher: LauncherKind::Command,
            scale_cmd: Some("exit 3".into()),
            stop_cmd: Some(format!("touch {}", f.display())),
            cpu_cmd: None,
            results: Some("spool:/r".into()),
            output: None,
            fleet_cores: None,
            cmd_timeout: 10.0,
        };
        let e = a.scale(&scale()).await.unwrap_err().to_string();
        assert!(e.contains("scale command failed") && e.contains("exit 3"), "{e}");
        assert!(f.exists(), "stop ran after the failed scale");
    }

    #[tokio::test]
    async fn slow_commands_time_out() {
        let a = LauncherArgs {
            launcher: LauncherKind::Command,
            scale_cmd: Some("sleep 5".into()),
            stop_cmd: Some("true".into()),
            cpu_cmd: None,
            results: Some("spool:/r".into()),
            output: None,
            fleet_cores: None,
            cmd_timeout: 0.3,
        };
        let e = a.scale(&scale()).await.unwrap_err().to_string();
        assert!(e.contains("did not finish within"), "{e}");
    }

    #[tokio::test]
    async fn a_failed_or_wordless_cpu_command_counts_as_not_measured() {
        for cpu in ["exit 1", "echo not-a-number", "true"] {
            let a = LauncherArgs {
                launcher: LauncherKind::Command,
                scale_cmd: Some("true".into()),
                stop_cmd: Some("true".into()),
                cpu_cmd: Some(cpu.into()),
                results: Some("spool:/r".into()),
                output: None,
                fleet_cores: None,
                cmd_timeout: 10.0,
            };
            let ext = a.scale(&scale()).await.unwrap().expect("external fleet");
            assert_eq!(ext.cpu_seconds().await, 0.0, "{cpu}");
        }
    }

    #[test]
    fn validation_names_what_is_missing() {
        let mut a = LauncherArgs {
            launcher: LauncherKind::Command,
            scale_cmd: None,
            stop_cmd: Some("true".into()),
            cpu_cmd: None,
            results: None,
            output: None,
            fleet_cores: None,
            cmd_timeout: 10.0,
        };
        let e = a.validate(None).unwrap_err().to_string();
        assert!(e.contains("--scale-cmd") && e.contains("--queue") && e.contains("--results"), "{e}");
        a.launcher = LauncherKind::Local;
        assert!(a.validate(None).unwrap_err().to_string().contains("--stop-cmd belongs to --launcher command"));
        a.stop_cmd = None;
        a.output = Some("gs://b/sweep".into());
        a.validate(None).unwrap();
        assert_eq!(a.fixed_queues(Some("spool:/q")), None);
    }
}
