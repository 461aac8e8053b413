//! TLS for `amqps://` URIs, with the query parameters RabbitMQ's own URI spec names:
//! - `cacertfile=PATH`: PEM file of the CA(s) that signed the broker's certificate (a private CA).
//!   Without it the broker is verified against the system's roots (`/etc/ssl/certs`).
//! - `certfile=PATH` and `keyfile=PATH` (both or neither): a PEM client certificate (chain) and
//!   its PEM private key, for brokers that ask for one (`fail_if_no_peer_cert`) or log in by
//!   certificate (`auth_mechanism=external`).
//! - `server_name_indication=NAME`: the name to verify the broker's certificate for (and send as
//!   SNI) when it differs from the host connected to, e.g. an IP address or a tunnel.
//! - `verify=verify_peer` is the only mode: certificates are always verified.
//!
//! TLS runs on rustls with the `ring` provider (no C crypto build). The files are read at every
//! connect, so a rotated certificate is picked up on the next reconnect. Every failure names the
//! host and says why ([`explain_io`]): an unknown CA, a name mismatch, an expired certificate, a
//! handshake refused by the broker — permanent, since retrying cannot fix a certificate — or an
//! unreachable broker, which is transient.

use std::io;
use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::{AlertDescription, CertificateError};

/// The TLS settings of an `amqps://` URI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    /// `cacertfile`: PEM CA certificate(s) trusted for the broker, added to the system roots.
    pub cacertfile: Option<PathBuf>,
    /// `certfile`: PEM client certificate chain (with [`Self::keyfile`]).
    pub certfile: Option<PathBuf>,
    /// `keyfile`: PEM private key of the client certificate (PKCS#8, PKCS#1 or SEC1).
    pub keyfile: Option<PathBuf>,
    /// `server_name_indication`: the name the certificate must carry; default: the URI's host.
    pub server_name_indication: Option<String>,
}

/// The query parameters this module owns; the rest go to lapin.
const PARAMS: &[&str] = &["cacertfile", "certfile", "keyfile", "server_name_indication", "verify"];

/// Split a broker URL into the URL lapin parses (TLS parameters removed) and the TLS settings
/// (`None` for `amqp://`). Errors say which parameter is wrong and why.
pub fn split(url: &str) -> Result<(String, Option<TlsParams>), String> {
    let tls = url.starts_with("amqps://");
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut p = TlsParams::default();
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !PARAMS.contains(&k) {
            rest.push(pair);
            continue;
        }
        if !tls {
            return Err(format!("`{k}` is a TLS setting: use amqps://"));
        }
        let v = super::uri::percent_decode(v).map_err(|e| format!("`{k}`: {e}"))?;
        if v.is_empty() {
            return Err(format!("`{k}` is empty"));
        }
        let slot = match k {
            "verify" if v == "verify_peer" => continue,
            "verify" => {
                return Err(format!(
                    "verify={v} is not supported: the broker's certificate is always verified \
                     (give its CA with cacertfile=PATH)"
                ))
            }
            "server_name_indication" => {
                rustls::pki_types::ServerName::try_from(v.as_str())
                    .map_err(|_| format!("server_name_indication={v:?} is not a DNS name or IP address"))?;
                p.server_name_indication.replace(v).is_some()
            }
            "cacertfile" => p.cacertfile.replace(v.into()).is_some(),
            "certfile" => p.certfile.replace(v.into()).is_some(),
            _ => p.keyfile.replace(v.into()).is_some(),
        };
        if slot {
            return Err(format!("`{k}` is given twice"));
        }
    }
    if p.certfile.is_some() != p.keyfile.is_some() {
        return Err("a client certificate needs both certfile=PATH and keyfile=PATH".into());
    }
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    Ok((url, tls.then_some(p)))
}

impl TlsParams {
    /// Read the files into lapin's TLS configuration; an unreadable or malformed file is an error
    /// naming it.
    pub fn load(&self) -> Result<OwnedTLSConfig, String> {
        let read = |what: &str, path: &Path| -> Result<Vec<u8>, String> {
            let bytes = std::fs::read(path).map_err(|e| format!("reading the {what} {}: {e}", path.display()))?;
            if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(format!("the {what} {} is not a PEM file (no -----BEGIN line)", path.display()));
            }
            Ok(bytes)
        };
        let cert_chain = match &self.cacertfile {
            Some(p) => Some(
                String::from_utf8(read("CA file (cacertfile)", p)?)
                    .map_err(|_| format!("the CA file (cacertfile) {} is not text", p.display()))?,
            ),
            None => None,
        };
        let identity = match (&self.certfile, &self.keyfile) {
            (Some(c), Some(k)) => Some(OwnedIdentity::PKCS8 {
                pem: read("client certificate (certfile)", c)?,
                key: read("client key (keyfile)", k)?,
            }),
            _ => None,
        };
        Ok(OwnedTLSConfig { identity, cert_chain })
    }
}

/// What a TLS (or TCP) failure while connecting to `host` means, and whether it is permanent:
/// a certificate problem will not go away by retrying; a refused or reset connection may.
pub fn explain_io(host: &str, e: &io::Error) -> (String, bool) {
    let mut src: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(s) = src {
        if let Some(t) = s.downcast_ref::<rustls::Error>() {
            return explain_rustls(host, t);
        }
        src = s.source();
    }
    // rustls-connector reports some handshake errors as text only.
    let text = e.to_string();
    let permanent = ["certificate", "Certificate", "PEM", "private key", "No private key", "InvalidData"]
        .iter()
        .any(|w| text.contains(w))
        || e.kind() == io::ErrorKind::InvalidData;
    if permanent {
        (format!("TLS with {host} failed: {text}"), true)
    } else {
        (format!("connecting to {host}: {text}"), false)
    }
}

fn explain_rustls(host: &str, e: &rustls::Error) -> (String, bool) {
    use rustls::Error as E;
    let why = match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "the broker's certificate is signed by an unknown CA (give the CA that signed it \
                 with cacertfile=PATH): {e}"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "the broker's certificate is not valid for the name {host} (connect by a name it \
                 carries, or set server_name_indication=NAME): {e}"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the broker's certificate has expired: {e}")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("the broker's certificate is not valid yet (check the clocks): {e}")
            }
            CertificateError::Revoked => format!("the broker's certificate is revoked: {e}"),
            _ => format!("the broker's certificate was rejected: {e}"),
        },
        E::AlertReceived(a) => match a {
            AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure => format!(
                "the broker refused the handshake ({a:?}): it may require a client certificate \
                 (certfile=PATH&keyfile=PATH)"
            ),
            AlertDescription::UnknownCA | AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
                format!("the broker refused the client certificate ({a:?}): is it signed by a CA the broker trusts?")
            }
            AlertDescription::CertificateExpired => "the broker refused the client certificate: it has expired".into(),
            _ => format!("the broker refused the handshake: alert {a:?}"),
        },
        E::NoCertificatesPresented => "the broker presented no certificate".into(),
        E::InvalidMessage(_) | E::InappropriateHandshakeMessage { .. } | E::InappropriateMessage { .. } => {
            format!("the broker did not speak TLS (is this its TLS port, 5671 by default?): {e}")
        }
        _ => format!("the TLS handshake failed: {e}"),
    };
    (format!("TLS with {host}: {why}"), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_tls_parameters_from_the_url() {
        let (u, t) =
            split("amqps://u:p@h:5671/v?heartbeat=5&cacertfile=%2Fetc%2Fca.pem&server_name_indication=broker.example")
                .unwrap();
        assert_eq!(u, "amqps://u:p@h:5671/v?heartbeat=5");
        let t = t.unwrap();
        assert_eq!(t.cacertfile.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(t.server_name_indication.as_deref(), Some("broker.example"));
        assert_eq!(split("amqps://h/v").unwrap(), ("amqps://h/v".into(), Some(TlsParams::default())));
        assert_eq!(split("amqp://h/v?heartbeat=5").unwrap(), ("amqp://h/v?heartbeat=5".into(), None));
        let (_, t) = split("amqps://h/v?certfile=/c.pem&keyfile=/k.pem&verify=verify_peer").unwrap();
        assert_eq!(t.unwrap().keyfile.as_deref(), Some(Path::new("/k.pem")));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let e = |u: &str| split(u).unwrap_err();
        assert!(e("amqp://h/v?cacertfile=/ca.pem").contains("amqps://"));
        assert!(e("amqps://h/v?certfile=/c.pem").contains("both certfile"));
        assert!(e("amqps://h/v?keyfile=/k.pem").contains("both certfile"));
        assert!(e("amqps://h/v?verify=verify_none").contains("always verified"));
        assert!(e("amqps://h/v?cacertfile=").contains("empty"));
        assert!(e("amqps://h/v?cacertfile=/a&cacertfile=/b").contains("twice"));
        assert!(e("amqps://h/v?server_name_indication=bad%20name").contains("not a DNS name"));
    }

    #[test]
    fn unreadable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TlsParams { cacertfile: Some(dir.path().join("nope.pem")), ..Default::default() };
        assert!(missing.load().unwrap_err().contains("nope.pem"));
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = TlsParams { cacertfile: Some(junk), ..Default::default() }.load().unwrap_err();
        assert!(e.contains("not a PEM file"), "{e}");
    }

    #[test]
    fn certificate_errors_are_permanent_and_say_why() {
        let wrap = |r: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, r);
        let (m, perm) = explain_io("h", &wrap(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)));
        assert!(perm && m.contains("unknown CA") && m.contains("cacertfile"), "{m}");
        let (m, _) = explain_io("h", &wrap(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)));
        assert!(m.contains("not valid for the name h"), "{m}");
        let (m, _) = explain_io("h", &wrap(rustls::Error::InvalidCertificate(CertificateError::Expired)));
        assert!(m.contains("expired"), "{m}");
        let (m, _) = explain_io("h", &wrap(rustls::Error::AlertReceived(AlertDescription::CertificateRequired)));
        assert!(m.contains("client certificate"), "{m}");
        let (m, perm) = explain_io("h", &io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(!perm && m.contains("connecting to h"), "{m}");
    }
}
