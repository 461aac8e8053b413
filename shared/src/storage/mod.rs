//! Storage: read sources and crop lists, write crops. One [`Storage`] facade dispatches by
//! [`Location`] to a backend behind the [`ObjectStore`] trait: local disk ([`local`]), Google
//! Cloud Storage for `gs://` ([`gcs`]) and read-only `http(s)://` sources ([`http`]).
//! [`Storage::from_env`] builds all three the way the binaries use them.

pub mod gcs;
pub mod http;
pub mod local;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use thiserror::Error;

use crate::failure::Failure;

/// Default limit on source bytes read for one task (256 MiB).
pub const DEFAULT_MAX_SOURCE_BYTES: u64 = 256 * 1024 * 1024;

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A local path (`/x`, `x`, `file:///x`).
    Local(PathBuf),
    /// `gs://bucket/key`.
    Gcs { bucket: String, key: String },
    /// `http://` or `https://` (read-only).
    Http(String),
}

impl Location {
    /// Parse a URI or plain path.
    pub fn parse(s: &str) -> Result<Location, StorageError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(StorageError::Invalid { uri: crate::secret::redact(s), reason: "empty location".into() });
        }
        if let Some(rest) = s.strip_prefix("gs://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StorageError::Invalid {
                    uri: crate::secret::redact(s),
                    reason: "gs:// URI without a bucket".into(),
                });
            }
            return Ok(Location::Gcs { bucket: bucket.into(), key: key.trim_start_matches('/').into() });
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(Location::Http(s.into()));
        }
        if let Some(rest) = s.strip_prefix("file://") {
            return Ok(Location::Local(PathBuf::from(rest)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(StorageError::Invalid {
                uri: crate::secret::redact(s),
                reason: format!("unsupported scheme {scheme}://"),
            });
        }
        Ok(Location::Local(PathBuf::from(s)))
    }

    /// A child object: `self/name`.
    pub fn join(&self, name: &str) -> Location {
        match self {
            Location::Local(p) => Location::Local(p.join(name)),
            Location::Gcs { bucket, key } => {
                let key =
                    if key.is_empty() { name.to_string() } else { format!("{}/{name}", key.trim_end_matches('/')) };
                Location::Gcs { bucket: bucket.clone(), key }
            }
            Location::Http(u) => Location::Http(format!("{}/{name}", u.trim_end_matches('/'))),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Gcs { bucket, key } => write!(f, "gs://{bucket}/{key}"),
            // Masked: a source URL may carry a token or a password (the request uses the original).
            Location::Http(u) => f.write_str(&crate::secret::redact(u)),
        }
    }
}

/// Storage failures, each naming the object (an `http(s)://` one with its credentials masked,
/// see [`crate::secret::redact`]).
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("{uri}: not found")]
    NotFound { uri: String },
    #[error("{uri}: {size} bytes, over the limit of {limit} bytes")]
    TooLarge { uri: String, size: u64, limit: u64 },
    #[error("{uri}: {reason}")]
    Invalid { uri: String, reason: String },
    #[error("{uri}: permission denied: {reason}")]
    Denied { uri: String, reason: String },
    #[error("{uri}: unreachable or failing, will retry: {reason}")]
    Unavailable { uri: String, reason: String },
    #[error("{uri}: I/O error: {source}")]
    Io { uri: String, source: std::io::Error },
    /// A `gs://` location in a process that has no Cloud Storage set up (see [`GcsMode`]).
    #[error("{uri}: Cloud Storage is not configured for this worker: {reason}")]
    NotConfigured { uri: String, reason: String },
}

impl StorageError {
    /// Missing, oversized, invalid or forbidden objects are permanent; outages are transient.
    pub fn failure(&self) -> Failure {
        match self {
            StorageError::Unavailable { .. } => Failure::Transient,
            StorageError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound
                | std::io::ErrorKind::PermissionDenied
                | std::io::ErrorKind::InvalidInput => Failure::Permanent,
                _ => Failure::Transient,
            },
            _ => Failure::Permanent,
        }
    }

    pub(crate) fn io(loc: &Location, source: std::io::Error) -> StorageError {
        match source.kind() {
            std::io::ErrorKind::NotFound => StorageError::NotFound { uri: loc.to_string() },
            std::io::ErrorKind::PermissionDenied => {
                StorageError::Denied { uri: loc.to_string(), reason: source.to_string() }
            }
            _ => StorageError::Io { uri: loc.to_string(), source },
        }
    }
}

/// One storage backend.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Read a whole object, refusing objects over `max_bytes`.
    async fn get(&self, loc: &Location, max_bytes: u64) -> Result<Vec<u8>, StorageError>;
    /// Write (create or overwrite) an object.
    async fn put(&self, loc: &Location, data: Vec<u8>) -> Result<(), StorageError>;
    /// Write several objects; returns the bytes written. The default runs the puts concurrently
    /// (the caller bounds concurrency); local disk overrides it to write a batch in one go.
    async fn put_many(&self, items: Vec<(Location, Vec<u8>)>) -> Result<u64, StorageError> {
        let puts = items.into_iter().map(|(loc, data)| async move {
            let n = data.len() as u64;
            self.put(&loc, data).await.map(|_| n)
        });
        Ok(futures::future::try_join_all(puts).await?.into_iter().sum())
    }
    /// Names of the objects under a prefix, relative to it, sorted.
    async fn list(&self, prefix: &Location) -> Result<Vec<String>, StorageError>;
}

/// The facade the worker uses: routes each location to its backend.
#[derive(Clone)]
pub struct Storage {
    local: Arc<dyn ObjectStore>,
    gcs: Option<Arc<dyn ObjectStore>>,
    /// Why `gs://` has no backend, when [`Storage::from_env`] decided against one.
    gcs_missing: Option<String>,
    http: Option<Arc<dyn ObjectStore>>,
}

/// Whether a process serves `gs://` (the worker's `--gcs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GcsMode {
    /// Serve `gs://` when Cloud Storage is set up: `STORAGE_EMULATOR_HOST`, or Application
    /// Default Credentials that can be found without a network call (see
    /// [`crate::gcp::detect_credentials`]). Otherwise `gs://` tasks are dead-lettered at once
    /// with [`StorageError::NotConfigured`] instead of retrying a metadata server that is not
    /// there.
    #[default]
    Auto,
    /// Always serve `gs://` with Application Default Credentials (or the emulator), even when
    /// none are detected (e.g. a metadata server this process cannot recognise).
    On,
    /// Never serve `gs://`: such tasks are dead-lettered.
    Off,
}

impl std::str::FromStr for GcsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(GcsMode::Auto),
            "on" => Ok(GcsMode::On),
            "off" => Ok(GcsMode::Off),
            other => Err(format!("unknown --gcs mode {other:?} (auto, on, off)")),
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage::local_only()
    }
}

/// What [`Storage::from_env`] takes from the command line.
#[derive(Debug, Clone, Default)]
pub struct StorageOptions {
    /// Let `http(s)://` sources reach loopback, private and link-local addresses
    /// (`--allow-private-sources`); off by default (SSRF guard, see [`http`]).
    pub allow_private_sources: bool,
    /// Whether to serve `gs://` (`--gcs`).
    pub gcs: GcsMode,
}

impl Storage {
    /// Local disk, `gs://` and `http(s)://`, as the binaries use them. Google Cloud Storage goes to
    /// the emulator named by `STORAGE_EMULATOR_HOST` when set, else to the real service with
    /// Application Default Credentials; its client is built on the first `gs://` call. With
    /// [`GcsMode::Auto`] and no emulator nor detectable credentials (a local run), `gs://` is
    /// not served: those tasks fail permanently with [`StorageError::NotConfigured`] rather than
    /// retrying a metadata server that does not exist. Detection reads environment variables and
    /// checks for files only; nothing connects here.
    pub fn from_env(opts: StorageOptions) -> Result<Storage, StorageError> {
        crate::gcp::install_crypto_provider();
        let http = http::HttpStore::new(opts.allow_private_sources)?;
        let storage = Storage::local_only().with_http(Arc::new(http));
        let serve = match opts.gcs {
            GcsMode::On => Ok(()),
            GcsMode::Off => Err("--gcs off".to_string()),
            GcsMode::Auto => match crate::gcp::detect_credentials() {
                Some(_) => Ok(()),
                None => Err(crate::gcp::NO_CREDENTIALS.to_string()),
            },
        };
        Ok(match serve {
            Ok(()) => storage.with_gcs(Arc::new(gcs::GcsStore::from_env())),
            Err(reason) => Storage { gcs_missing: Some(reason), ..storage },
        })
    }

    /// Local disk only; `gs://` and `http(s)://` are rejected with a clear error.
    pub fn local_only() -> Storage {
        Storage { local: Arc::new(local::LocalStore), gcs: None, gcs_missing: None, http: None }
    }

    /// Whether `gs://` is served, and if not, why.
    pub fn gcs_status(&self) -> Result<(), &str> {
        match (&self.gcs, &self.gcs_missing) {
            (Some(_), _) => Ok(()),
            (None, Some(reason)) => Err(reason),
            (None, None) => Err("not enabled in this process"),
        }
    }

    /// Add a Google Cloud Storage backend for `gs://`.
    pub fn with_gcs(mut self, gcs: Arc<dyn ObjectStore>) -> Storage {
        self.gcs = Some(gcs);
        self
    }

    /// Add an HTTP(S) backend for reading `http(s)://` sources.
    pub fn with_http(mut self, http: Arc<dyn ObjectStore>) -> Storage {
        self.http = Some(http);
        self
    }

    fn backend(&self, loc: &Location) -> Result<&Arc<dyn ObjectStore>, StorageError> {
        let missing = |what: &str| StorageError::Invalid {
            uri: loc.to_string(),
            reason: format!("{what} is not enabled in this process"),
        };
        match loc {
            Location::Local(_) => Ok(&self.local),
            Location::Gcs { .. } => self.gcs.as_ref().ok_or_else(|| match &self.gcs_missing {
                Some(reason) => StorageError::NotConfigured { uri: loc.to_string(), reason: reason.clone() },
                None => missing("Google Cloud Storage (gs://)"),
            }),
            Location::Http(_) => self.http.as_ref().ok_or_else(|| missing("HTTP(S) reading")),
        }
    }

    /// Check that this process can reach `loc` at all (its backend is set up), without I/O:
    /// the worker calls it before downloading, so a `gs://` output on a worker without Cloud
    /// Storage fails before any work is done.
    pub fn check(&self, loc: &Location) -> Result<(), StorageError> {
        self.backend(loc).map(|_| ())
    }

    /// Read a whole object, refusing objects over `max_bytes`.
    pub async fn get(&self, loc: &Location, max_bytes: u64) -> Result<Vec<u8>, StorageError> {
        self.backend(loc)?.get(loc, max_bytes).await
    }

    /// Write (create or overwrite) an object; `http(s)://` is read-only.
    pub async fn put(&self, loc: &Location, data: Vec<u8>) -> Result<(), StorageError> {
        if let Location::Http(_) = loc {
            return Err(StorageError::Invalid {
                uri: loc.to_string(),
                reason: "http(s) locations are read-only".into(),
            });
        }
        self.backend(loc)?.put(loc, data).await
    }

    /// Write a batch of objects that share a backend (e.g. the crops of one task).
    pub async fn put_many(&self, items: Vec<(Location, Vec<u8>)>) -> Result<u64, StorageError> {
        let Some((first, _)) = items.first() else { return Ok(0) };
        if let Location::Http(_) = first {
            return Err(StorageError::Invalid {
                uri: first.to_string(),
                reason: "http(s) locations are read-only".into(),
            });
        }
        self.backend(first)?.put_many(items).await
    }

    /// Names of the objects under a prefix (a folder), relative to it, sorted.
    pub async fn list(&self, prefix: &Location) -> Result<Vec<String>, StorageError> {
        self.backend(prefix)?.list(prefix).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(Location::parse("/a/b").unwrap(), Location::Local("/a/b".into()));
        assert_eq!(Location::parse("file:///a/b").unwrap(), Location::Local("/a/b".into()));
        assert_eq!(Location::parse("gs://bkt/x/y").unwrap(), Location::Gcs { bucket: "bkt".into(), key: "x/y".into() });
        assert_eq!(Location::parse("gs://bkt").unwrap().join("t1").join("000.jpg").to_string(), "gs://bkt/t1/000.jpg");
        assert!(Location::parse("gs:///x").is_err());
        assert!(Location::parse("ftp://x").is_err());
        assert!(matches!(Location::parse("https://h/x.jpg").unwrap(), Location::Http(_)));
    }

    #[test]
    fn gcs_off_is_a_permanent_error_naming_the_uri() {
        let s = Storage::from_env(StorageOptions { gcs: GcsMode::Off, ..Default::default() }).unwrap();
        let loc = Location::parse("gs://bkt/out").unwrap();
        let e = s.check(&loc).unwrap_err();
        assert_eq!(e.failure(), Failure::Permanent);
        assert_eq!(e.to_string(), "gs://bkt/out: Cloud Storage is not configured for this worker: --gcs off");
        assert_eq!(s.gcs_status(), Err("--gcs off"));
        s.check(&Location::parse("/tmp/x").unwrap()).unwrap();
        let on = Storage::from_env(StorageOptions { gcs: GcsMode::On, ..Default::default() }).unwrap();
        on.check(&loc).unwrap();
        assert_eq!("auto".parse::<GcsMode>(), Ok(GcsMode::Auto));
        assert!("maybe".parse::<GcsMode>().is_err());
    }
}
