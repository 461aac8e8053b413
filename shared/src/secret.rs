//! Keeping credentials out of everything cropfleet prints or stores: logs, errors, summaries,
//! progress lines, run records and result events. Every URI that may carry one (a queue URI
//! such as `amqp://user:password@host/…`, a source such as `https://host/a.jpg?X-Goog-Signature=…`)
//! goes through [`redact`] before it is shown; the original is used only to connect.

/// Query (and fragment) parameter names whose value is a credential, compared without case;
/// a name that contains one of [`SECRET_WORDS`] counts too.
const SECRET_PARAMS: &[&str] = &["pass", "pwd", "key", "apikey", "api_key", "sig", "auth", "code"];
/// Words that make a parameter name secret wherever they appear in it (`access_token`,
/// `client_secret`, `X-Amz-Security-Token`, `X-Goog-Signature`, `X-Goog-Credential`, …).
const SECRET_WORDS: &[&str] = &["password", "passwd", "secret", "token", "signature", "credential", "session"];

/// What replaces a secret.
pub const MASK: &str = "***";

/// `uri` with every credential it carries replaced by `***`:
/// - the password of a `user:password@` userinfo (the user name is kept: it is not a secret and
///   says which account was used);
/// - a userinfo without a password (`https://TOKEN@host/…`) in any scheme but `amqp`/`amqps`,
///   where it can only be a user name;
/// - the value of every query or fragment parameter whose name says it is a credential
///   (`password`, `token`, `access_token`, `key`, `sig`, `X-Goog-Signature`, …).
///
/// Text that is not a URI (a path, `spool:dir`) comes back unchanged.
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{MASK}{host}"),
                None if scheme.eq_ignore_ascii_case("amqp") || scheme.eq_ignore_ascii_case("amqps") => {
                    authority.to_string()
                }
                None => format!("{MASK}{host}"),
            }
        }
        None => authority.to_string(),
    };
    format!("{scheme}://{authority}{}", redact_params(tail))
}

/// The path, query and fragment with secret parameter values masked.
fn redact_params(tail: &str) -> String {
    let (before_frag, fragment) = match tail.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (tail, None),
    };
    let mut out = match before_frag.split_once('?') {
        Some((path, query)) => format!("{path}?{}", mask_pairs(query)),
        None => before_frag.to_string(),
    };
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(&mask_pairs(f));
    }
    out
}

fn mask_pairs(s: &str) -> String {
    s.split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if !value.is_empty() && is_secret_param(name) => format!("{name}={MASK}"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn is_secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    SECRET_PARAMS.contains(&n.as_str()) || SECRET_WORDS.iter().any(|w| n.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_and_keeps_user_names() {
        assert_eq!(redact("amqp://u:pw@h:1/%2f?queue=q"), "amqp://u:***@h:1/%2f?queue=q");
        assert_eq!(redact("amqps://u:p%40ss@h/v?queue=q&heartbeat=5"), "amqps://u:***@h/v?queue=q&heartbeat=5");
        assert_eq!(redact("amqp://guest@h/%2f?queue=q"), "amqp://guest@h/%2f?queue=q");
        assert_eq!(redact("amqp://h/%2f"), "amqp://h/%2f");
        assert_eq!(redact("amqp://u:pw@h"), "amqp://u:***@h");
        // The userinfo ends at the last '@' of the authority: an unescaped '@' in a password.
        assert_eq!(redact("amqp://u:a@b@h/%2f"), "amqp://u:***@h/%2f");
        // An '@' in the path is not a userinfo.
        assert_eq!(redact("https://h/a@b.jpg"), "https://h/a@b.jpg");
    }

    #[test]
    fn masks_tokens_in_userinfo_query_and_fragment() {
        assert_eq!(redact("https://ghp_abc@host/x.jpg"), "https://***@host/x.jpg");
        assert_eq!(
            redact("https://s.example/b/o.jpg?X-Goog-Algorithm=GOOG4&X-Goog-Credential=a%2Fb&X-Goog-Signature=f00d"),
            "https://s.example/b/o.jpg?X-Goog-Algorithm=GOOG4&X-Goog-Credential=***&X-Goog-Signature=***"
        );
        assert_eq!(
            redact("amqps://h/v?queue=q&password=pw&cacertfile=/ca.pem"),
            "amqps://h/v?queue=q&password=***&cacertfile=/ca.pem"
        );
        assert_eq!(redact("https://h/cb#access_token=t0k&state=1"), "https://h/cb#access_token=***&state=1");
        assert_eq!(redact("https://h/x?key=k&sig=s&id=7"), "https://h/x?key=***&sig=***&id=7");
    }

    #[test]
    fn leaves_other_text_alone() {
        for s in ["spool:/tmp/q", "/data/a.jpg", "gs://bucket/key", "pubsub://p/crops?ack_deadline=10", ""] {
            assert_eq!(redact(s), s);
        }
    }
}
