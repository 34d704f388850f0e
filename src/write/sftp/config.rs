//! `sftp://USER@HOST[:PORT]/REMOTE/DIR` and every SFTP option, validated before any I/O.
//!
//! The URL follows draft-ietf-secsh-scp-sftp-ssh-uri-04 section 4 as curl does: the path is
//! absolute on the server (`sftp://h/upload` is `/upload`), and `/~/` starts a path in the
//! login directory (`sftp://h/~/out` is `out` relative to home). Parts the URL leaves out come
//! from flags or the environment (`SFTP_HOST`, `SFTP_USERNAME`, `SFTP_DIRECTORY`, as the
//! Cloud Run deployment in the seed guide names them), so `--to sftp:` works from env alone.
//! A password in the URL is refused: URLs end up in shell history, `ps` and logs.

use std::path::PathBuf;
use std::time::Duration;

use super::hostkey::HostKeyPolicy;
use crate::error::ConfigError;
use crate::secret::Secret;

pub const DEFAULT_PORT: u16 = 22;
/// SSH connections per target. Also the channels one large file is striped over: OpenSSH
/// gives each channel a 2 MiB window and tops it up when half is used, which caps one channel
/// at ~40 MB/s at 40 ms round trip (measured through examples/delay_proxy.rs: 1 GiB at 40 ms
/// took 4 connections to 172 MB/s, 8 to 293 MB/s; on loopback 8 cost nothing). A server that
/// refuses some of them gets fewer, with a warning.
pub const DEFAULT_CONNECTIONS: usize = 8;
/// Write requests in flight per file (object_store's `WriteMultipart` keeps a similar window).
pub const DEFAULT_REQUESTS: usize = 64;
/// Write size when the server advertises no limits: draft-02 section 3 obliges servers to
/// accept packets of at least 34000 bytes, so 32 KiB of data always fits.
pub const DEFAULT_WRITE_SIZE: usize = 32 * 1024;
pub const DEFAULT_RETRIES: u32 = 8;
pub const DEFAULT_RETRY_WAIT: Duration = Duration::from_secs(1);
/// Longest wait between reconnect attempts.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
pub const DEFAULT_KEEPALIVE_MAX: u32 = 3;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// `--verify`: what is checked on the server before a file is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// The remote size equals the bytes sent (one stat).
    #[default]
    Size,
    /// Size, then `sha256sum` run on the server over an exec channel; digests must match.
    Sha256Remote,
    None,
}

/// A validated SFTP target. Built by [`SftpConfig::from_url`], completed by the CLI's
/// `SftpArgs`, checked by [`SftpConfig::validate`].
#[derive(Debug, Clone)]
pub struct SftpConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Remote directory as the server sees it: absolute, or relative to the login directory.
    pub dir: String,
    pub password: Option<Secret>,
    pub identity: Option<PathBuf>,
    /// The private key's text, when it comes from a secret rather than a file.
    pub identity_data: Option<Secret>,
    pub passphrase: Option<Secret>,
    /// Try the keys of the ssh-agent at `SSH_AUTH_SOCK`.
    pub use_agent: bool,
    pub host_keys: HostKeyPolicy,
    /// Algorithm lists as given (`name,name` replaces the defaults, `+name` adds to them).
    pub ciphers: Option<String>,
    pub kex: Option<String>,
    pub macs: Option<String>,
    pub connections: usize,
    pub requests: usize,
    /// Upper bound on one write; the server's advertised limit wins when smaller.
    pub write_size: Option<usize>,
    pub retries: u32,
    pub retry_wait: Duration,
    /// Keepalive interval (zero: none); the connection is dropped after `keepalive_max`
    /// unanswered intervals, or as long with requests in flight and no reply.
    pub keepalive: Duration,
    pub keepalive_max: u32,
    pub connect_timeout: Duration,
    /// fsync@openssh.com before publishing (like `sftp -f`).
    pub fsync: bool,
    /// Bytes after which session keys are renewed (OpenSSH `RekeyLimit`); russh's default
    /// (1 GiB, RFC 4253 section 9) when `None`. Capped at 1 GiB.
    pub rekey_limit: Option<usize>,
    pub inplace: bool,
    pub verify: Verify,
}

impl SftpConfig {
    /// Parses what follows `--to`: `sftp://[USER@]HOST[:PORT][/PATH]`, or `sftp:` alone when
    /// everything comes from flags and the environment.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let bad = |problem: String| ConfigError::invalid(format!("--to {url}"), problem);
        let mut cfg = SftpConfig::empty();
        if url == "sftp:" || url == "sftp://" {
            return Ok(cfg);
        }
        let parsed =
            url::Url::parse(url).map_err(|e| bad(format!("not a valid URL ({e}); use sftp://USER@HOST[:PORT]/DIR")))?;
        if parsed.password().is_some() {
            return Err(bad(
                "a password in the URL would show in logs and `ps`; pass it in SFTP_PASSWORD or --sftp-password-file"
                    .into(),
            ));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("an sftp URL takes no ?query or #fragment".into()));
        }
        cfg.user = percent_decode(parsed.username()).map_err(bad)?;
        cfg.host = parsed.host_str().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_string();
        cfg.port = parsed.port().unwrap_or(0);
        let path = percent_decode(parsed.path()).map_err(bad)?;
        cfg.dir = match path.as_str() {
            "" => String::new(),
            "/~" | "/~/" => ".".to_string(),
            p if p.starts_with("/~/") => p["/~/".len()..].to_string(),
            p => p.to_string(),
        };
        Ok(cfg)
    }

    fn empty() -> Self {
        SftpConfig {
            host: String::new(),
            port: 0,
            user: String::new(),
            dir: String::new(),
            password: None,
            identity: None,
            identity_data: None,
            passphrase: None,
            use_agent: std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| !s.is_empty()),
            host_keys: HostKeyPolicy::KnownHosts(default_known_hosts()),
            ciphers: None,
            kex: None,
            macs: None,
            connections: DEFAULT_CONNECTIONS,
            requests: DEFAULT_REQUESTS,
            write_size: None,
            retries: DEFAULT_RETRIES,
            retry_wait: DEFAULT_RETRY_WAIT,
            keepalive: DEFAULT_KEEPALIVE,
            keepalive_max: DEFAULT_KEEPALIVE_MAX,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            fsync: false,
            rekey_limit: None,
            inplace: false,
            verify: Verify::Size,
        }
    }

    /// Checks that the target is complete and consistent. No I/O.
    /// Every secret this configuration holds (the one list to extend with a new secret field).
    pub fn secrets_mut(&mut self) -> [&mut Option<Secret>; 3] {
        [&mut self.password, &mut self.identity_data, &mut self.passphrase]
    }

    /// The Secret Manager versions still to fetch (`gcp-secret:` references).
    pub fn gcp_references(&self) -> Vec<&str> {
        [&self.password, &self.identity_data, &self.passphrase]
            .into_iter()
            .filter_map(|s| s.as_ref().and_then(Secret::gcp_reference))
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let what = || format!("--to {}", self.describe());
        if self.host.is_empty() {
            return Err(ConfigError::invalid(what(), "no host: use sftp://USER@HOST/DIR, or set SFTP_HOST"));
        }
        if self.user.is_empty() {
            return Err(ConfigError::invalid(what(), "no user name: use sftp://USER@HOST/DIR, or set SFTP_USERNAME"));
        }
        if self.dir.contains('\0') || self.host.contains(['/', '@', ' ']) {
            return Err(ConfigError::invalid(what(), "the host or directory contains characters a path cannot hold"));
        }
        if self.password.is_none() && self.identity.is_none() && self.identity_data.is_none() && !self.use_agent {
            return Err(ConfigError::invalid(
                what(),
                "no credentials: pass --identity KEY (or the key in SFTP_PRIVATE_KEY), set SFTP_PASSWORD (or --sftp-password-file), or run an ssh-agent (SSH_AUTH_SOCK)",
            ));
        }
        if self.identity.is_some() && self.identity_data.is_some() {
            return Err(ConfigError::invalid("--identity/--sftp-key-data", "give the private key one way, not both"));
        }
        if self.connections == 0 || self.requests == 0 {
            return Err(ConfigError::invalid("--sftp-connections/--sftp-requests", "must be at least 1"));
        }
        if let Some(w) = self.write_size
            && !(512..=(16 << 20)).contains(&w)
        {
            return Err(ConfigError::invalid("--sftp-write-size", "must be between 512 bytes and 16 MiB"));
        }
        for (flag, list, names) in [
            ("--ciphers", &self.ciphers, supported_ciphers()),
            ("--kex", &self.kex, supported_kex()),
            ("--macs", &self.macs, supported_macs()),
        ] {
            if let Some(list) = list {
                algorithm_list(flag, list, &names)?;
            }
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        if self.port == 0 { DEFAULT_PORT } else { self.port }
    }

    /// `sftp://user@host[:port]`: the server, without the directory.
    pub fn origin(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let port = if self.port() == DEFAULT_PORT { String::new() } else { format!(":{}", self.port()) };
        let user = if self.user.is_empty() { String::new() } else { format!("{}@", self.user) };
        format!("sftp://{user}{host}{port}")
    }

    /// `sftp://user@host[:port]/dir`: for logs and the manifest, never with secrets.
    pub fn describe(&self) -> String {
        let dir = if self.dir.starts_with('/') {
            self.dir.clone()
        } else if self.dir.is_empty() || self.dir == "." {
            "/~".to_string()
        } else {
            format!("/~/{}", self.dir)
        };
        format!("{}{dir}", self.origin())
    }

    /// The directory to write into: "." (the login directory) when none was given.
    pub fn remote_dir(&self) -> &str {
        if self.dir.is_empty() { "." } else { &self.dir }
    }

    /// `dir/name`, as the server sees it.
    pub fn remote_path(&self, name: &str) -> String {
        let dir = self.remote_dir();
        if dir.ends_with('/') { format!("{dir}{name}") } else { format!("{dir}/{name}") }
    }

    /// How long requests may go unanswered before the connection counts as dead.
    pub fn stall_timeout(&self) -> Option<Duration> {
        (!self.keepalive.is_zero()).then(|| self.keepalive * (self.keepalive_max + 1))
    }
}

fn default_known_hosts() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".ssh").join("known_hosts")
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(b) = hex else { return Err(format!("bad percent escape in '{s}'")) };
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' does not decode to UTF-8"))
}

pub fn supported_ciphers() -> Vec<&'static str> {
    // `none` and `clear` exist in russh for tests; a data transfer never wants them.
    russh::cipher::ALL_CIPHERS.iter().map(|n| n.as_ref()).filter(|n| !matches!(*n, "none" | "clear")).collect()
}

pub fn supported_kex() -> Vec<&'static str> {
    russh::kex::ALL_KEX_ALGORITHMS.iter().map(|n| n.as_ref()).filter(|n| *n != "none").collect()
}

pub fn supported_macs() -> Vec<&'static str> {
    russh::mac::ALL_MAC_ALGORITHMS.iter().map(|n| n.as_ref()).filter(|n| *n != "none").collect()
}

/// Parses `a,b,c` (replace the defaults) or `+a,b` (append to them), OpenSSH's syntax.
/// Returns the names and whether they are appended.
pub fn algorithm_list(
    flag: &str,
    list: &str,
    supported: &[&'static str],
) -> Result<(Vec<&'static str>, bool), ConfigError> {
    let (append, body) = match list.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, list),
    };
    let mut names = Vec::new();
    for name in body.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match supported.iter().find(|s| **s == name) {
            Some(s) => names.push(*s),
            None => {
                return Err(ConfigError::invalid(
                    format!("{flag} {list}"),
                    format!("'{name}' is not supported; choose from {}", supported.join(",")),
                ));
            }
        }
    }
    if names.is_empty() {
        return Err(ConfigError::invalid(format!("{flag} {list}"), "names no algorithm"));
    }
    Ok((names, append))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let c = SftpConfig::from_url("sftp://partner@sftp.example.com/incoming/daily").unwrap();
        assert_eq!(
            (c.user.as_str(), c.host.as_str(), c.port(), c.dir.as_str()),
            ("partner", "sftp.example.com", 22, "/incoming/daily")
        );
        assert_eq!(c.describe(), "sftp://partner@sftp.example.com/incoming/daily");
        let c = SftpConfig::from_url("sftp://u%40corp@127.0.0.1:2222/~/out%20dir").unwrap();
        assert_eq!((c.user.as_str(), c.port(), c.dir.as_str()), ("u@corp", 2222, "out dir"));
        assert_eq!(c.remote_path("a.csv"), "out dir/a.csv");
        assert_eq!(c.describe(), "sftp://u@corp@127.0.0.1:2222/~/out dir");
        let c = SftpConfig::from_url("sftp://u@[::1]:22/").unwrap();
        assert_eq!((c.host.as_str(), c.remote_path("x")), ("::1", "/x".to_string()));
        let c = SftpConfig::from_url("sftp://u@h").unwrap();
        assert_eq!((c.remote_dir(), c.describe().as_str()), (".", "sftp://u@h/~"));
        let c = SftpConfig::from_url("sftp:").unwrap();
        assert!(c.host.is_empty());
    }

    #[test]
    fn refusals() {
        let e = SftpConfig::from_url("sftp://u:hunter2@h/x").unwrap_err().to_string();
        assert!(e.contains("SFTP_PASSWORD"), "{e}");
        let mut c = SftpConfig::from_url("sftp://h/x").unwrap();
        c.use_agent = false;
        assert!(c.validate().unwrap_err().to_string().contains("SFTP_USERNAME"));
        c.user = "u".into();
        assert!(c.validate().unwrap_err().to_string().contains("no credentials"));
        c.password = Some(Secret::new("p"));
        c.validate().unwrap();
        c.ciphers = Some("aes128-gcm@openssh.com,rot13".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("'rot13' is not supported") && e.contains("chacha20-poly1305@openssh.com"), "{e}");
        assert!(!format!("{c:?}").contains("\"p\""), "the password never shows in Debug");
    }

    #[test]
    fn algorithm_lists() {
        let (names, append) = algorithm_list("--macs", "+hmac-sha1", &supported_macs()).unwrap();
        assert_eq!((names, append), (vec!["hmac-sha1"], true));
        assert!(algorithm_list("--ciphers", "none", &supported_ciphers()).is_err());
    }
}
