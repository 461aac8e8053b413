//! Plumbing shared by the Google Cloud backends ([`crate::storage::gcs`] and the Pub/Sub queue):
//! the TLS crypto provider, emulator endpoints and credentials.
//!
//! - **Crypto provider.** The google-cloud-rust 1.x crates are built with default features off,
//!   so they bring no rustls crypto provider (the default would compile aws-lc, a C/CMake build).
//!   rustls runs on *ring* instead, which must be installed process-wide before the first Google
//!   client or reqwest client is built — even for plain-`http://` emulator endpoints, or building
//!   the client panics ("No rustls crypto provider is configured"). Call
//!   [`install_crypto_provider`] first; it is idempotent and cheap.
//! - **Emulators.** The 1.x crates do not read `PUBSUB_EMULATOR_HOST` / `STORAGE_EMULATOR_HOST`
//!   themselves. [`emulator_host`] turns such a variable into an endpoint URL for
//!   `.with_endpoint(..)`, and an emulator needs [`anonymous_credentials`] (`.with_credentials(..)`):
//!   without them the clients look for Application Default Credentials, fall back to the metadata
//!   server and fail at the first call.
//! - **Production.** Without the variable, leave the endpoint and credentials unset: the clients use
//!   the public endpoint and Application Default Credentials.

use std::path::{Path, PathBuf};
use std::sync::Once;

use google_cloud_auth::credentials::Credentials;

/// The variable naming the Pub/Sub emulator (`HOST:PORT`), as the Google Cloud CLI sets it.
pub const PUBSUB_EMULATOR_HOST: &str = "PUBSUB_EMULATOR_HOST";
/// The variable naming the Cloud Storage emulator (`HOST:PORT` or `http://HOST:PORT`).
pub const STORAGE_EMULATOR_HOST: &str = "STORAGE_EMULATOR_HOST";

/// Install rustls' *ring* crypto provider as the process default, once. Call it before building
/// any Google client or reqwest client; later calls do nothing. If another provider was installed
/// first (by the embedding program), that one stays.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means a provider is already installed: fine, rustls uses that one.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The emulator endpoint named by the environment variable `var` (e.g. [`STORAGE_EMULATOR_HOST`]),
/// as a URL for `.with_endpoint(..)`; `None` when the variable is unset or blank (use the real
/// service). See [`endpoint_url`] for the accepted forms.
pub fn emulator_host(var: &str) -> Option<String> {
    let v = std::env::var(var).ok()?;
    let v = v.trim();
    (!v.is_empty()).then(|| endpoint_url(v))
}

/// Normalise an emulator address: `HOST:PORT` becomes `http://HOST:PORT` (emulators speak plain
/// HTTP), an `http://` or `https://` URL is kept; a trailing `/` is dropped.
pub fn endpoint_url(host: &str) -> String {
    let host = host.trim().trim_end_matches('/');
    if host.starts_with("http://") || host.starts_with("https://") {
        host.to_string()
    } else {
        format!("http://{host}")
    }
}

/// Why `gs://` is off in auto mode: what [`detect_credentials`] looked for and found none of.
pub const NO_CREDENTIALS: &str = "no STORAGE_EMULATOR_HOST, no Application Default Credentials \
     (GOOGLE_APPLICATION_CREDENTIALS or gcloud's application_default_credentials.json) and not \
     running on Google Cloud; set one of them, or start the worker with --gcs on to use the \
     metadata server anyway";

/// Where Cloud Storage credentials would come from, found without any network call, or `None`:
/// the emulator variable, `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's ADC file
/// (`$CLOUDSDK_CONFIG` or `~/.config/gcloud`), or signs of Google Cloud whose metadata server
/// provides credentials (`GCE_METADATA_HOST`, Cloud Run / Functions variables, a DMI product
/// name of "Google…" on Compute Engine and GKE nodes).
pub fn detect_credentials() -> Option<String> {
    detect_credentials_in(&|k| std::env::var(k).ok(), Path::new("/"))
}

/// [`detect_credentials`] over a given environment and file-system root (for tests).
pub fn detect_credentials_in(env: &dyn Fn(&str) -> Option<String>, root: &Path) -> Option<String> {
    let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if let Some(v) = set(STORAGE_EMULATOR_HOST) {
        return Some(format!("the emulator at {v} ({STORAGE_EMULATOR_HOST})"));
    }
    if let Some(v) = set("GOOGLE_APPLICATION_CREDENTIALS") {
        return Some(format!("GOOGLE_APPLICATION_CREDENTIALS={v}"));
    }
    let gcloud = set("CLOUDSDK_CONFIG")
        .map(PathBuf::from)
        .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".config/gcloud")));
    if let Some(file) = gcloud.map(|d| d.join("application_default_credentials.json")) {
        let file = if file.is_absolute() { root.join(file.strip_prefix("/").unwrap_or(&file)) } else { file };
        if file.is_file() {
            return Some(format!("Application Default Credentials in {}", file.display()));
        }
    }
    for k in ["GCE_METADATA_HOST", "GCE_METADATA_IP", "K_SERVICE", "CLOUD_RUN_JOB", "FUNCTION_TARGET"] {
        if set(k).is_some() {
            return Some(format!("the metadata server ({k} is set)"));
        }
    }
    let dmi = std::fs::read_to_string(root.join("sys/class/dmi/id/product_name")).unwrap_or_default();
    if dmi.trim_start().starts_with("Google") {
        return Some(format!("the metadata server (on {})", dmi.trim()));
    }
    None
}

/// Credentials that send no headers: what the emulators expect.
pub fn anonymous_credentials() -> Credentials {
    google_cloud_auth::credentials::anonymous::Builder::new().build()
}

/// Where a Google client connects, from the environment: `Some((endpoint, anonymous credentials))`
/// when the emulator variable `var` is set, `None` for the real service with Application Default
/// Credentials. Typical use:
///
/// ```ignore
/// let mut b = Client::builder();
/// if let Some((endpoint, creds)) = cropfleet::gcp::emulator(cropfleet::gcp::PUBSUB_EMULATOR_HOST) {
///     b = b.with_endpoint(endpoint).with_credentials(creds);
/// }
/// ```
pub fn emulator(var: &str) -> Option<(String, Credentials)> {
    emulator_host(var).map(|e| (e, anonymous_credentials()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(endpoint_url("127.0.0.1:8085"), "http://127.0.0.1:8085");
        assert_eq!(endpoint_url(" http://127.0.0.1:4443/ "), "http://127.0.0.1:4443");
        assert_eq!(endpoint_url("https://gcs.example:443"), "https://gcs.example:443");
        assert_eq!(emulator_host("CROPFLEET_SURELY_UNSET_VARIABLE"), None);
    }

    #[test]
    fn credentials_detection() {
        let root = tempfile::tempdir().unwrap();
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(detect_credentials_in(&env(&[("HOME", "/home/u")]), root.path()), None);
        assert_eq!(detect_credentials_in(&env(&[(STORAGE_EMULATOR_HOST, " ")]), root.path()), None);
        let found =
            |vars: &'static [(&'static str, &'static str)]| detect_credentials_in(&env(vars), root.path()).unwrap();
        assert!(found(&[(STORAGE_EMULATOR_HOST, "127.0.0.1:4443")]).contains("emulator"));
        assert!(found(&[("GOOGLE_APPLICATION_CREDENTIALS", "/k.json")]).contains("/k.json"));
        assert!(found(&[("K_SERVICE", "svc")]).contains("metadata server"));
        let adc = root.path().join("home/u/.config/gcloud");
        std::fs::create_dir_all(&adc).unwrap();
        std::fs::write(adc.join("application_default_credentials.json"), "{}").unwrap();
        assert!(found(&[("HOME", "/home/u")]).contains("application_default_credentials.json"));
        std::fs::create_dir_all(root.path().join("sys/class/dmi/id")).unwrap();
        std::fs::write(root.path().join("sys/class/dmi/id/product_name"), "Google Compute Engine\n").unwrap();
        assert!(found(&[]).contains("Google Compute Engine"));
    }

    #[test]
    fn provider_install_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
