//! Deciding whether to trust the server's host key, before any credential is sent.
//!
//! Three policies: an OpenSSH `known_hosts` file (the default, `~/.ssh/known_hosts`), pinned
//! SHA-256 fingerprints (`--host-key-fingerprint SHA256:...`, what a Secret Manager entry can
//! hold), or `--insecure-accept-any-host-key`, which exists for throwaway test servers and is
//! logged as a warning on every run.
//!
//! known_hosts lookup is russh's (`known_host_keys_path`): plain names, hashed entries
//! (`|1|salt|hmac`, OpenSSH `HashKnownHosts`) and `[host]:port` for non-22 ports. The decision
//! is ours, and is OpenSSH's: a recorded key equal to the server's is trusted; recorded keys
//! for the host but none equal is a *mismatch* (possible man-in-the-middle); no recorded key is
//! an *unknown host*. Either refusal names both fingerprints so the operator can compare them
//! with what the partner published. Markers (`@cert-authority`, `@revoked`) and wildcard
//! patterns are not interpreted: such lines never match, so they can only cause a refusal.

use std::path::{Path, PathBuf};

use russh::keys::{Algorithm, HashAlg, PublicKey};

/// How the server's host key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyPolicy {
    KnownHosts(PathBuf),
    /// known_hosts lines themselves (a secret mounted as a variable). [`KnownHostsLines::materialize`]
    /// turns them into a private file for the duration of a sink.
    KnownHostsLines(String),
    /// Normalised `SHA256:<base64 without padding>` fingerprints; any one may match.
    Fingerprints(Vec<String>),
    AcceptAny,
}

/// The outcome of a check, kept so a refused connection can explain itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Trusted,
    Unknown {
        got: String,
        known_hosts: Option<PathBuf>,
    },
    Mismatch {
        expected: Vec<String>,
        got: String,
        known_hosts: Option<PathBuf>,
    },
    /// The known_hosts file exists but could not be read or parsed.
    Unreadable(String),
}

/// `SHA256:...` of a key, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Accepts `SHA256:base64` with or without `=` padding (ssh-keygen prints none; some tools
/// add it). MD5 fingerprints are refused: they do not identify a key safely.
pub fn parse_fingerprint(s: &str) -> Result<String, String> {
    let s = s.trim();
    let Some(b64) = s.strip_prefix("SHA256:") else {
        return Err(format!(
            "'{s}' is not a SHA256 fingerprint; expected SHA256:... as `ssh-keygen -lf KEY` or `ssh-keyscan HOST | ssh-keygen -lf -` print it"
        ));
    };
    let b64 = b64.trim_end_matches('=');
    // 32 bytes of SHA-256 are 43 base64 characters without padding.
    if b64.len() != 43 || !b64.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/') {
        return Err(format!("'{s}' is not a valid SHA256 fingerprint (expected 43 base64 characters after SHA256:)"));
    }
    Ok(format!("SHA256:{b64}"))
}

/// The name known_hosts records for a host: `host` on port 22, `[host]:port` otherwise.
pub fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 { host.to_string() } else { format!("[{host}]:{port}") }
}

impl HostKeyPolicy {
    pub fn check(&self, host: &str, port: u16, key: &PublicKey) -> Verdict {
        let got = fingerprint(key);
        match self {
            HostKeyPolicy::AcceptAny => Verdict::Trusted,
            HostKeyPolicy::Fingerprints(pins) => {
                if pins.contains(&got) {
                    Verdict::Trusted
                } else {
                    Verdict::Mismatch { expected: pins.clone(), got, known_hosts: None }
                }
            }
            HostKeyPolicy::KnownHostsLines(_) => {
                Verdict::Unreadable("known_hosts lines were not written to a file before connecting (a bug)".into())
            }
            HostKeyPolicy::KnownHosts(path) => match recorded_keys(path, host, port) {
                Err(e) => Verdict::Unreadable(e),
                Ok(recorded) if recorded.is_empty() => Verdict::Unknown { got, known_hosts: Some(path.clone()) },
                Ok(recorded) if recorded.iter().any(|k| k.key_data() == key.key_data()) => Verdict::Trusted,
                Ok(recorded) => Verdict::Mismatch {
                    expected: recorded.iter().map(fingerprint).collect(),
                    got,
                    known_hosts: Some(path.clone()),
                },
            },
        }
    }

    /// Host key algorithms of the keys recorded for this host, so the key exchange asks the
    /// server for a key we can check (OpenSSH orders `HostKeyAlgorithms` the same way).
    /// Without this a server with ed25519 and RSA keys, recorded only by its RSA key, would
    /// present ed25519 and be refused as unknown.
    pub fn known_algorithms(&self, host: &str, port: u16) -> Vec<Algorithm> {
        let HostKeyPolicy::KnownHosts(path) = self else { return Vec::new() };
        let mut out = Vec::new();
        for key in recorded_keys(path, host, port).unwrap_or_default() {
            let algs = match key.algorithm() {
                Algorithm::Rsa { .. } => {
                    vec![Algorithm::Rsa { hash: Some(HashAlg::Sha512) }, Algorithm::Rsa { hash: Some(HashAlg::Sha256) }]
                }
                other => vec![other],
            };
            for a in algs {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        out
    }
}

fn recorded_keys(path: &Path, host: &str, port: u16) -> Result<Vec<PublicKey>, String> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    russh::keys::known_hosts::known_host_keys_path(host, port, path)
        .map(|keys| keys.into_iter().map(|(_, k)| k).collect())
        .map_err(|e| format!("cannot read known_hosts file {}: {e}", path.display()))
}

/// known_hosts lines held in a private temporary file while a sink lives: russh reads
/// known_hosts from a path. The file has an unpredictable name, is created exclusively (no
/// symlink or pre-created file is followed) with mode 0600, and is removed on drop.
pub struct KnownHostsLines {
    path: PathBuf,
}

impl KnownHostsLines {
    pub fn materialize(lines: &str) -> std::io::Result<Self> {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("bq2sftp-known-hosts-{}", uuid::Uuid::new_v4().simple()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&path)?;
        file.write_all(lines.as_bytes())?;
        file.write_all(b"\n")?;
        Ok(KnownHostsLines { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for KnownHostsLines {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The refusal, worded for the operator: what was expected, what came, what to do.
pub fn explain(verdict: &Verdict, host: &str, port: u16) -> String {
    let name = known_hosts_name(host, port);
    match verdict {
        Verdict::Trusted => format!("host key for {name} is trusted"),
        Verdict::Unknown { got, known_hosts } => {
            let file = known_hosts.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            format!(
                "host {name} is not in known_hosts file {file} (server key {got}); if that fingerprint is the one your partner published, add the key with `ssh-keyscan -p {port} {host} >> {file}` or pass --host-key-fingerprint {got}"
            )
        }
        Verdict::Mismatch { expected, got, known_hosts } => {
            let source = match known_hosts {
                Some(p) => format!("known_hosts file {}", p.display()),
                None => "--host-key-fingerprint".to_string(),
            };
            format!(
                "host key for {name} does not match {source} (expected {}, got {got}); the server key changed or someone is intercepting the connection. Confirm the new fingerprint with the server's owner, then update {source}",
                expected.join(" or ")
            )
        }
        Verdict::Unreadable(e) => e.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEOMqWcpEM9bAXgPlmDzhHzrZ7dOV27nFsk9hfGmMGgk";
    const OTHER: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAOPonx/0LM1CXSvL1ossTxYuheyhdgtoC9dh2SjfVoF";

    fn key(line: &str) -> PublicKey {
        PublicKey::from_openssh(line).unwrap()
    }

    #[test]
    fn fingerprints_parse_and_normalise() {
        let fp = fingerprint(&key(ED));
        assert!(fp.starts_with("SHA256:") && fp.len() == 50, "{fp}");
        assert_eq!(parse_fingerprint(&format!("{fp}=")).unwrap(), fp);
        assert!(parse_fingerprint("MD5:12:34").is_err());
        assert!(parse_fingerprint("SHA256:short").is_err());
    }

    #[test]
    fn known_hosts_plain_port_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        std::fs::write(&kh, format!("# comment\nexample.com {ED}\n[example.com]:2222 {OTHER}\n")).unwrap();
        let policy = HostKeyPolicy::KnownHosts(kh.clone());
        assert_eq!(policy.check("example.com", 22, &key(ED)), Verdict::Trusted);
        assert_eq!(policy.check("example.com", 2222, &key(OTHER)), Verdict::Trusted);
        let Verdict::Mismatch { expected, got, .. } = policy.check("example.com", 2222, &key(ED)) else {
            panic!("expected a mismatch")
        };
        assert_eq!((expected, got), (vec![fingerprint(&key(OTHER))], fingerprint(&key(ED))));
        assert!(matches!(policy.check("other.org", 22, &key(ED)), Verdict::Unknown { .. }));
        assert_eq!(policy.known_algorithms("example.com", 22), vec![Algorithm::Ed25519]);
        let missing = HostKeyPolicy::KnownHosts(dir.path().join("nope"));
        assert!(matches!(missing.check("example.com", 22, &key(ED)), Verdict::Unknown { .. }));
    }

    #[test]
    fn pinned_fingerprints() {
        let policy = HostKeyPolicy::Fingerprints(vec![fingerprint(&key(OTHER)), fingerprint(&key(ED))]);
        assert_eq!(policy.check("h", 22, &key(ED)), Verdict::Trusted);
        let only_other = HostKeyPolicy::Fingerprints(vec![fingerprint(&key(OTHER))]);
        let v = only_other.check("h", 22, &key(ED));
        let text = explain(&v, "h", 22);
        assert!(text.contains(&fingerprint(&key(OTHER))) && text.contains(&fingerprint(&key(ED))), "{text}");
    }
}
