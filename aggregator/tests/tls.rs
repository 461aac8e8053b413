//! The fleet over `amqps://` against a real RabbitMQ node with a TLS-only listener that requires a
//! client certificate (`common/tls_broker.rs`: certificates made at test time, a second node on
//! free ports, the machine's main broker untouched): a producer → workers → results round trip
//! with the real binaries, and the failures a user meets named clearly and not retried (an
//! unknown CA, a name mismatch, no client certificate, TLS to a plain port, a missing file).
//! A broker restart over TLS with nothing lost is the chaos suite's `rabbitmq_tls_local`.

mod common;

use std::process::Command;

use common::tls_broker::TlsBroker;
use common::*;

const CROPS: usize = 8;

#[test]
fn producer_workers_and_results_over_amqps_with_a_client_certificate() {
    let b = TlsBroker::start();
    let mut f = Fleet::new();
    f.tasks = b.uri("tls", "");
    f.results = b.uri("tls-results", "");
    run_ok("cropfleet-producer", &["setup", "--queue", &f.tasks, "--results", &f.results]);
    let w = workload(f.dir.path(), CROPS);
    let (img, crops, out) = (w.image.display().to_string(), w.crops.display().to_string(), f.out.display().to_string());
    let n = 20;
    let p = run_ok(
        "cropfleet-producer",
        &["--queue", &f.tasks, "--image", &img, "--crops", &crops, "--output", &out, "--repeat", &n.to_string()],
    );
    let stdout = String::from_utf8_lossy(&p.stdout);
    assert!(stdout.contains(&format!("{n} of {n} tasks confirmed by amqps://guest:***@localhost:")), "{stdout}");
    f.start_worker(&["--threads", "1", "--exit-when-idle", "3"]);
    f.start_worker(&["--threads", "1", "--exit-when-idle", "3"]);
    for w in &mut f.workers {
        assert!(w.wait().unwrap().success());
    }
    assert_eq!(f.outputs().len(), n * CROPS, "lost crops; logs:\n{}", f.logs());
    let runs = f.collect_runs(2);
    assert_eq!(runs[0]["tasks"], n as u64, "{runs}\n{}", f.logs());
    assert_eq!(runs[0]["backend"], "rabbitmq");
    let text = runs.to_string();
    assert!(text.contains("amqps://guest:***@localhost") && !text.contains("guest:guest"), "{text}");
}

/// `cropfleet-producer setup` on `uri`: it must fail, at once (the error is permanent: no
/// "retrying" line), with stderr naming every word of `want`.
fn refused(uri: &str, want: &[&str]) {
    let out = Command::new(bin("cropfleet-producer"))
        .args(["setup", "--queue", uri, "--results", uri])
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "connected, but must not: {uri}\n{err}");
    eprintln!("refused as it should be:\n{}\n", err.trim());
    for w in want {
        assert!(err.contains(w), "the error lacks {w:?}:\n{err}");
    }
    assert!(!err.contains("retrying"), "a permanent TLS error was retried:\n{err}");
    assert!(!err.contains("guest:guest"), "password shown:\n{err}");
}

#[test]
fn tls_failures_are_refused_with_a_clear_reason() {
    let b = TlsBroker::start();
    let good = b.uri("refused", "");
    // The broker's CA is not the one given (nor a system root).
    refused(&good.replace("/ca.pem", "/other-ca.pem"), &["localhost", "unknown CA", "cacertfile"]);
    // Connected by a name the certificate does not carry.
    refused(&format!("{good}&server_name_indication=broker.example"), &["not valid for the name broker.example"]);
    // No client certificate: the broker requires one.
    let no_cert = good.split("&certfile=").next().unwrap().to_string();
    refused(&no_cert, &["client certificate"]);
    // TLS to the plain AMQP port of the main broker.
    refused(&no_cert.replace(&format!(":{}/", b.port), ":5672/"), &["did not speak TLS"]);
    // Files that are missing or not PEM.
    refused(&good.replace("/client.key", "/nope.key"), &["nope.key"]);
    refused(&good.replace("/ca.pem", "/enabled_plugins"), &["not a PEM file"]);
    // And the same broker by IP, with the name to verify given: accepted.
    let by_ip = format!("{}&server_name_indication=localhost", good.replace("@localhost:", "@127.0.0.1:"));
    run_ok("cropfleet-producer", &["setup", "--queue", &by_ip, "--results", &by_ip]);
    // A worker that cannot verify the broker exits with the reason instead of retrying forever.
    let out = Command::new(bin("cropfleet-worker"))
        .args(["--queue", &good.replace("/ca.pem", "/other-ca.pem"), "--results", &good, "--http-addr", "off"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown CA"), "{err}");
}
