//! The SFTP flags of `bq2sftp export`, flattened into `ExportArgs`, and how they complete the
//! `--to sftp://...` target.
//!
//! Every secret can come from the environment or a file instead of the command line (flags
//! show in `ps` and shell history): `SFTP_PASSWORD` or `--sftp-password-file`,
//! `SFTP_IDENTITY_PASSPHRASE` or `--identity-passphrase-file`, the key itself in
//! `SFTP_PRIVATE_KEY`. A secret value may also be a reference, as job files use them:
//! `file:PATH` (the file's contents) or `env:NAME`. The environment names follow the seed
//! guide's Cloud Run deployment (`SFTP_HOST`, `SFTP_USERNAME`, `SFTP_PASSWORD`,
//! `SFTP_DIRECTORY`), and deploy/gcp.sh's (`SFTP_PRIVATE_KEY`, `SFTP_KNOWN_HOSTS` holding the
//! key and the known_hosts lines themselves), so secrets mounted as variables work unchanged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::config::{SftpConfig, Verify};
use super::hostkey::{self, HostKeyPolicy};
use crate::error::ConfigError;
use crate::secret::{Secret, resolve_local};
use crate::write::SinkConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyArg {
    /// Compare the remote size with the bytes sent.
    Size,
    /// Also run sha256sum on the server (needs shell access) and compare digests.
    Sha256Remote,
    /// No check on the server.
    None,
}

fn secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s.trim_end_matches('s').parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&v) {
        return Err(format!("'{s}' is out of range (0 to 86400 seconds)"));
    }
    Ok(Duration::from_secs_f64(v))
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "SFTP target (--to sftp://USER@HOST[:PORT]/DIR)")]
pub struct SftpArgs {
    /// Host, when the URL leaves it out (e.g. `--to sftp:`).
    #[arg(long, env = "SFTP_HOST", value_name = "HOST")]
    pub sftp_host: Option<String>,

    /// Port, when the URL leaves it out (default 22).
    #[arg(long, env = "SFTP_PORT", value_name = "PORT")]
    pub sftp_port: Option<u16>,

    /// User name, when the URL leaves it out.
    #[arg(long, env = "SFTP_USERNAME", value_name = "USER")]
    pub sftp_user: Option<String>,

    /// Remote directory, when the URL leaves it out (absolute, or relative to the login directory).
    #[arg(long, env = "SFTP_DIRECTORY", value_name = "DIR")]
    pub sftp_dir: Option<String>,

    /// Password, or a reference to it (file:PATH, env:NAME). Prefer the SFTP_PASSWORD variable
    /// or --sftp-password-file: flags show in `ps`.
    #[arg(long, env = "SFTP_PASSWORD", hide_env_values = true, value_parser = secret, value_name = "PASSWORD")]
    pub sftp_password: Option<Secret>,

    /// File holding the password (one trailing newline is ignored).
    #[arg(long, value_name = "FILE")]
    pub sftp_password_file: Option<PathBuf>,

    /// Private key: OpenSSH, PEM or PKCS#8; ed25519, ECDSA or RSA (signed with rsa-sha2-256/512).
    #[arg(long, env = "SFTP_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,

    /// The private key itself (its text, or file:PATH / env:NAME), as Secret Manager mounts it.
    #[arg(long, env = "SFTP_PRIVATE_KEY", hide_env_values = true, value_parser = secret, value_name = "KEY", conflicts_with = "identity")]
    pub sftp_key_data: Option<Secret>,

    /// Passphrase of the private key (or file:PATH, env:NAME).
    #[arg(long, env = "SFTP_IDENTITY_PASSPHRASE", hide_env_values = true, value_parser = secret, value_name = "PASSPHRASE")]
    pub identity_passphrase: Option<Secret>,

    /// File holding the passphrase of the private key.
    #[arg(long, value_name = "FILE")]
    pub identity_passphrase_file: Option<PathBuf>,

    /// Do not try the keys of a running ssh-agent (SSH_AUTH_SOCK).
    #[arg(long)]
    pub no_agent: bool,

    /// known_hosts file to verify the server against (OpenSSH format; hashed and [host]:port
    /// entries work), or its lines themselves (as a mounted secret holds them).
    /// Default: ~/.ssh/known_hosts.
    #[arg(long, env = "SFTP_KNOWN_HOSTS", value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,

    /// Trust only a host key with this fingerprint (SHA256:..., as `ssh-keygen -lf` prints it).
    /// Repeat or separate with commas to allow a key rotation. Replaces known_hosts.
    #[arg(long, env = "SFTP_HOST_KEY_FINGERPRINT", value_delimiter = ',', value_name = "SHA256:...")]
    pub host_key_fingerprint: Vec<String>,

    /// Do not verify the server's host key at all (test servers only; logged as a warning).
    #[arg(long)]
    pub insecure_accept_any_host_key: bool,

    /// Ciphers to offer, most preferred first; `+name` adds to the defaults (OpenSSH syntax).
    #[arg(long, value_name = "LIST")]
    pub ciphers: Option<String>,

    /// Key exchange algorithms to offer; `+name` adds to the defaults.
    #[arg(long, value_name = "LIST")]
    pub kex: Option<String>,

    /// MAC algorithms to offer; `+name` adds to the defaults.
    #[arg(long, value_name = "LIST")]
    pub macs: Option<String>,

    /// SSH connections to the server. A large file is also striped over them, which is what
    /// makes far-away servers fast (one SSH channel moves at most 2 MiB per round trip).
    #[arg(long, default_value_t = super::config::DEFAULT_CONNECTIONS, value_name = "N")]
    pub sftp_connections: usize,

    /// Write requests in flight per file.
    #[arg(long, default_value_t = super::config::DEFAULT_REQUESTS, value_name = "N")]
    pub sftp_requests: usize,

    /// Bytes per write request (default: the server's advertised maximum, else 32KiB; never
    /// more than the server advertises).
    #[arg(long, value_name = "SIZE")]
    pub sftp_write_size: Option<String>,

    /// Reconnect attempts after a dropped connection or a failed connect (waits double from
    /// --sftp-retry-wait up to 30s).
    #[arg(long, default_value_t = super::config::DEFAULT_RETRIES, value_name = "N")]
    pub sftp_retries: u32,

    /// First wait before reconnecting, in seconds.
    #[arg(long, default_value = "1", value_parser = seconds, value_name = "SECS")]
    pub sftp_retry_wait: Duration,

    /// Keepalive interval in seconds (0: off). A connection with no reply for
    /// interval x (--sftp-keepalive-max + 1) is dropped and resumed.
    #[arg(long, default_value = "15", value_parser = seconds, value_name = "SECS")]
    pub sftp_keepalive: Duration,

    /// Unanswered keepalives before the connection counts as dead.
    #[arg(long, default_value_t = super::config::DEFAULT_KEEPALIVE_MAX, value_name = "N")]
    pub sftp_keepalive_max: u32,

    /// Seconds allowed for connecting, the SSH handshake and authentication.
    #[arg(long, default_value = "30", value_parser = seconds, value_name = "SECS")]
    pub sftp_connect_timeout: Duration,

    /// Ask the server to fsync each file before it is published (like `sftp -f`).
    #[arg(long)]
    pub sftp_fsync: bool,

    /// Write directly to the final name, without NAME.partial and rename (for servers that
    /// forbid renames; a reader may then see a file while it is being written).
    #[arg(long)]
    pub inplace: bool,

    /// What to check on the server before a file is published.
    #[arg(long, value_enum, default_value = "size")]
    pub verify: VerifyArg,
}

impl SftpArgs {
    /// Completes an `sftp` target with these flags (and their environment variables) and
    /// validates it. Other targets are left alone.
    pub fn apply(&self, target: &mut SinkConfig) -> Result<(), ConfigError> {
        let SinkConfig::Sftp(cfg) = target else { return Ok(()) };
        self.apply_to(cfg)
    }

    pub fn apply_to(&self, cfg: &mut SftpConfig) -> Result<(), ConfigError> {
        // The URL wins over flags and the environment for the parts it gives.
        if cfg.host.is_empty() {
            cfg.host = self.sftp_host.clone().unwrap_or_default();
        }
        if cfg.port == 0 {
            cfg.port = self.sftp_port.unwrap_or(0);
        }
        if cfg.user.is_empty() {
            cfg.user = self.sftp_user.clone().unwrap_or_default();
        }
        if cfg.dir.is_empty() {
            cfg.dir = self.sftp_dir.clone().unwrap_or_default();
        }
        let read = |flag: &str, path: &PathBuf| {
            Secret::from_file(path)
                .map_err(|e| ConfigError::invalid(format!("{flag} {}", path.display()), format!("cannot read it: {e}")))
        };
        cfg.password = match (&self.sftp_password_file, &self.sftp_password) {
            (Some(f), _) => Some(read("--sftp-password-file", f)?),
            (None, Some(p)) => Some(resolve_local("--sftp-password", p)?),
            (None, None) => None,
        };
        cfg.password = cfg.password.take().filter(|p| !p.is_empty());
        cfg.identity = self.identity.clone();
        cfg.identity_data = match &self.sftp_key_data {
            Some(k) => Some(resolve_local("--sftp-key-data", k)?).filter(|k| !k.is_empty()),
            None => None,
        };
        cfg.passphrase = match (&self.identity_passphrase_file, &self.identity_passphrase) {
            (Some(f), _) => Some(read("--identity-passphrase-file", f)?),
            (None, Some(p)) => Some(resolve_local("--identity-passphrase", p)?),
            (None, None) => None,
        };
        if let Some(key) = &cfg.identity
            && !key.is_file()
        {
            return Err(ConfigError::invalid(format!("--identity {}", key.display()), "no such file"));
        }
        if self.no_agent {
            cfg.use_agent = false;
        }
        cfg.host_keys = if self.insecure_accept_any_host_key {
            HostKeyPolicy::AcceptAny
        } else if !self.host_key_fingerprint.is_empty() {
            let pins = self
                .host_key_fingerprint
                .iter()
                .map(|f| hostkey::parse_fingerprint(f).map_err(|e| ConfigError::invalid("--host-key-fingerprint", e)))
                .collect::<Result<Vec<_>, _>>()?;
            HostKeyPolicy::Fingerprints(pins)
        } else if let Some(file) = &self.known_hosts {
            known_hosts_policy(file)?
        } else {
            cfg.host_keys.clone()
        };
        cfg.ciphers = self.ciphers.clone();
        cfg.kex = self.kex.clone();
        cfg.macs = self.macs.clone();
        cfg.connections = self.sftp_connections;
        cfg.requests = self.sftp_requests;
        cfg.write_size = match &self.sftp_write_size {
            None => None,
            Some(s) => Some(crate::cli::parse_size(s).ok_or_else(|| {
                ConfigError::invalid(format!("--sftp-write-size {s}"), "not a size; use e.g. 64KiB or 261120")
            })? as usize),
        };
        cfg.retries = self.sftp_retries;
        cfg.retry_wait = self.sftp_retry_wait;
        cfg.keepalive = self.sftp_keepalive;
        cfg.keepalive_max = self.sftp_keepalive_max;
        cfg.connect_timeout = self.sftp_connect_timeout.max(Duration::from_millis(100));
        cfg.fsync = self.sftp_fsync;
        cfg.inplace = self.inplace;
        cfg.verify = match self.verify {
            VerifyArg::Size => Verify::Size,
            VerifyArg::Sha256Remote => Verify::Sha256Remote,
            VerifyArg::None => Verify::None,
        };
        cfg.validate()
    }
}

/// `--known-hosts`: a file, or known_hosts lines (what a secret mounted as a variable holds).
fn known_hosts_policy(given: &Path) -> Result<HostKeyPolicy, ConfigError> {
    if given.is_file() {
        return Ok(HostKeyPolicy::KnownHosts(given.to_path_buf()));
    }
    let text = given.to_string_lossy();
    let looks_like_lines = text.lines().any(|l| {
        let mut fields = l.split_whitespace();
        fields.next().is_some() && fields.next().is_some_and(|t| t.starts_with("ssh-") || t.starts_with("ecdsa-"))
    });
    if !looks_like_lines {
        return Err(ConfigError::invalid(
            format!("--known-hosts {text}"),
            "no such file; create it with `ssh-keyscan -p PORT HOST > FILE` after checking the fingerprint",
        ));
    }
    Ok(HostKeyPolicy::KnownHostsLines(text.into_owned()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sftp: SftpArgs,
    }

    fn parse(args: &[&str]) -> SftpArgs {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().sftp
    }

    #[test]
    fn flags_complete_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let a = parse(&[
            "--sftp-host",
            "h.example",
            "--sftp-user",
            "u",
            "--sftp-dir",
            "/in",
            "--sftp-password-file",
            pw.to_str().unwrap(),
            "--host-key-fingerprint",
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
        ]);
        let mut cfg = SftpConfig::from_url("sftp:").unwrap();
        a.apply_to(&mut cfg).unwrap();
        assert_eq!(cfg.describe(), "sftp://u@h.example/in");
        assert_eq!(cfg.password.as_ref().map(Secret::expose), Some("s3cret"));
        assert!(matches!(cfg.host_keys, HostKeyPolicy::Fingerprints(ref p) if p.len() == 1));
        let mut url = SftpConfig::from_url("sftp://other@h2:2222/out").unwrap();
        a.apply_to(&mut url).unwrap();
        assert_eq!(url.describe(), "sftp://other@h2:2222/out", "the URL wins");
        assert!(!format!("{a:?} {url:?}").contains("s3cret"));
    }

    #[test]
    fn secrets_by_reference_and_known_hosts_lines() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "from-file\n").unwrap();
        let reference = format!("file:{}", pw.display());
        let line = "[h]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEOMqWcpEM9bAXgPlmDzhHzrZ7dOV27nFsk9hfGmMGgk";
        let a = parse(&["--sftp-password", &reference, "--known-hosts", line]);
        let mut cfg = SftpConfig::from_url("sftp://u@h:2222/d").unwrap();
        a.apply_to(&mut cfg).unwrap();
        assert_eq!(cfg.password.as_ref().map(Secret::expose), Some("from-file"));
        assert_eq!(cfg.host_keys, HostKeyPolicy::KnownHostsLines(line.to_string()));
        let a = parse(&["--sftp-password", "env:BQ2SFTP_TEST_SURELY_UNSET_VAR"]);
        let err = a.apply_to(&mut SftpConfig::from_url("sftp://u@h/d").unwrap()).unwrap_err().to_string();
        assert!(err.contains("not set"), "{err}");
    }

    #[test]
    fn bad_flags_fail_before_any_io() {
        let a = parse(&["--host-key-fingerprint", "MD5:aa:bb", "--sftp-password", "x"]);
        let mut cfg = SftpConfig::from_url("sftp://u@h/d").unwrap();
        assert!(a.apply_to(&mut cfg).unwrap_err().to_string().contains("SHA256"));
        let a = parse(&["--sftp-write-size", "lots", "--sftp-password", "x"]);
        assert!(a.apply_to(&mut SftpConfig::from_url("sftp://u@h/d").unwrap()).is_err());
        let a = parse(&["--known-hosts", "/nonexistent/kh", "--sftp-password", "x"]);
        assert!(
            a.apply_to(&mut SftpConfig::from_url("sftp://u@h/d").unwrap())
                .unwrap_err()
                .to_string()
                .contains("ssh-keyscan")
        );
    }
}
