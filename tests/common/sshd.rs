//! A real OpenSSH server for the SFTP tests: `sshd -D -e -f CONFIG` on 127.0.0.1 and an
//! ephemeral port, with its own host key, user key, `authorized_keys` and `internal-sftp`,
//! everything in a temp dir, stopped by its process group id when dropped.
//!
//! Files uploaded land in `Sshd::root` (a local directory), so a test asserts on them the
//! way a partner would see them. Key authentication logs in as the user running the tests;
//! password and keyboard-interactive tests need a user with a known password, which only
//! root can create: [`PASSWORD_USER`] (scripts/test.sh creates it; the harness does too when
//! it runs as root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bq2sftp::write::sftp::hostkey::HostKeyPolicy;
use bq2sftp::write::sftp::{SftpConfig, SftpSink};
use bq2sftp::write::{Sink, TargetOptions};

/// A local account with a known password, for password and keyboard-interactive tests.
pub const PASSWORD_USER: &str = "bq2sftp-test";
pub const PASSWORD: &str = "bq2sftp-test-password-7d1f";

pub struct Sshd {
    pub port: u16,
    /// Where uploads land (served at the same absolute path).
    pub root: PathBuf,
    /// The user key logs in as this user.
    pub user: String,
    /// ed25519 private key in `authorized_keys`, unencrypted.
    pub user_key: PathBuf,
    /// `[127.0.0.1]:PORT ssh-ed25519 ...`: the server's host key.
    pub known_hosts: PathBuf,
    /// `SHA256:...` of the host key.
    pub fingerprint: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

#[derive(Default, Clone)]
pub struct SshdOptions {
    /// Log in by password as [`PASSWORD_USER`] (needs root).
    pub password_user: bool,
    /// PAM keyboard-interactive instead of plain password authentication.
    pub keyboard_interactive: bool,
    /// Lines put first in sshd_config, so they override the harness's (`Ciphers ...`).
    pub extra: String,
}

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn sshd_binary() -> PathBuf {
    for p in ["/usr/sbin/sshd", "/usr/local/sbin/sshd"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("sshd")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes a key pair with ssh-keygen; returns the private key path.
pub fn keygen(dir: &Path, name: &str, kind: &str, passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", name, "-f"]).arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    run(&mut cmd);
    path
}

pub fn public_key(private: &Path) -> String {
    std::fs::read_to_string(private.with_extension("pub"))
        .or_else(|_| std::fs::read_to_string(format!("{}.pub", private.display())))
        .expect("public key")
}

fn current_user() -> String {
    run(Command::new("id").arg("-un")).trim().to_string()
}

/// Creates [`PASSWORD_USER`] with [`PASSWORD`] if missing (root only), once per test process
/// (concurrent `chpasswd` runs fail to lock /etc/shadow).
pub fn ensure_password_user() {
    static DONE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return;
    }
    assert!(is_root(), "password tests need root (to create {PASSWORD_USER}); run them through scripts/test.sh");
    let exists = Command::new("id").arg(PASSWORD_USER).output().is_ok_and(|o| o.status.success());
    if !exists {
        // No home, no shell: the account exists for SFTP tests on 127.0.0.1 only.
        let out = Command::new("useradd")
            .args(["--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", PASSWORD_USER])
            .output()
            .expect("useradd runs");
        // Another test may have created it at the same moment.
        let exists = Command::new("id").arg(PASSWORD_USER).output().is_ok_and(|o| o.status.success());
        assert!(exists, "useradd failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut child = Command::new("chpasswd").stdin(Stdio::piped()).spawn().expect("chpasswd runs");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(format!("{PASSWORD_USER}:{PASSWORD}\n").as_bytes()).expect("write");
    assert!(child.wait().expect("chpasswd").success(), "chpasswd failed");
    *done = true;
}

impl Sshd {
    pub fn start() -> Sshd {
        Sshd::start_with(SshdOptions::default())
    }

    /// A server where [`PASSWORD_USER`] logs in with [`PASSWORD`]. Creating that account
    /// needs root (CI and scripts/test.sh run as root); otherwise the test says so and skips.
    pub fn with_password_user(opts: SshdOptions) -> Option<Sshd> {
        if !is_root() {
            // scripts/test.sh sets this when it runs as root (as CI does): there a skip would
            // hide a test that should have run.
            assert!(
                std::env::var_os("BQ2SFTP_REQUIRE_ROOT_TESTS").is_none(),
                "BQ2SFTP_REQUIRE_ROOT_TESTS is set but the tests do not run as root"
            );
            eprintln!(
                "SKIPPED: this test needs root to create the account {PASSWORD_USER}; run scripts/test.sh as root"
            );
            return None;
        }
        Some(Sshd::start_with(SshdOptions { password_user: true, ..opts }))
    }

    pub fn start_with(opts: SshdOptions) -> Sshd {
        if opts.password_user {
            ensure_password_user();
        }
        if is_root() {
            // sshd's privilege separation directory; scripts/test.sh makes it too.
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let root = d.join("files");
        std::fs::create_dir(&root).expect("files dir");
        use std::os::unix::fs::PermissionsExt;
        // The password user must reach and write the files directory.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).expect("chmod");

        let host_key = keygen(d, "host_ed25519", "ed25519", "");
        let user_key = keygen(d, "user_ed25519", "ed25519", "");
        std::fs::write(d.join("authorized_keys"), public_key(&user_key)).expect("authorized_keys");
        let fingerprint = run(Command::new("ssh-keygen").arg("-lf").arg(host_key.with_extension("pub")))
            .split_whitespace()
            .nth(1)
            .expect("fingerprint")
            .to_string();

        let user = if opts.password_user { PASSWORD_USER.to_string() } else { current_user() };
        let auth = if opts.keyboard_interactive {
            "UsePAM yes\nKbdInteractiveAuthentication yes\nPasswordAuthentication no\n"
        } else {
            "UsePAM no\nKbdInteractiveAuthentication no\nPasswordAuthentication yes\n"
        };
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            // sshd takes the first value of a keyword: the extra lines go first to win.
            let config = format!(
                "{extra}\nPort {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPubkeyAuthentication yes\n{auth}\
                 PermitRootLogin yes\nUseDNS no\n{subsystem}MaxStartups 200\n\
                 MaxSessions 64\nMaxAuthTries 10\nLogLevel VERBOSE\n",
                host = host_key.display(),
                d = d.display(),
                extra = opts.extra,
                // sshd refuses a second Subsystem line: the extra lines may bring their own.
                subsystem = if opts.extra.contains("Subsystem sftp") { "" } else { "Subsystem sftp internal-sftp\n" },
            );
            let config_path = d.join("sshd_config");
            std::fs::write(&config_path, config).expect("sshd_config");
            let log = std::fs::File::create(d.join("sshd.log")).expect("log file");
            use std::os::unix::process::CommandExt;
            let mut child = Command::new(sshd_binary())
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .process_group(0)
                .spawn()
                .expect("sshd starts (scripts/test.sh installs openssh-server)");
            if wait_for_banner(port, &mut child) {
                let known_hosts = d.join("known_hosts");
                let host_pub = public_key(&host_key);
                let mut parts = host_pub.split_whitespace();
                let line =
                    format!("[127.0.0.1]:{port} {} {}\n", parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                std::fs::write(&known_hosts, line).expect("known_hosts");
                return Sshd { port, root, user, user_key, known_hosts, fingerprint, dir, child };
            }
            // The port was taken between our probe and sshd's bind: try another.
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("sshd did not start; log:\n{}", std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default());
    }

    /// `sftp://user@127.0.0.1:PORT/<root>/<sub>`
    pub fn url(&self, sub: &str) -> String {
        format!("sftp://{}@127.0.0.1:{}{}", self.user, self.port, self.path(sub).display())
    }

    /// The local directory behind `url(sub)`.
    pub fn path(&self, sub: &str) -> PathBuf {
        if sub.is_empty() { self.root.clone() } else { self.root.join(sub) }
    }

    /// A configuration for `sub` with key authentication and a pinned host key, fast retries,
    /// three connections, and the agent off (tests never use the developer's agent).
    pub fn config(&self, sub: &str) -> SftpConfig {
        self.config_for_port(sub, self.port)
    }

    /// The same, connecting through another port (a proxy in front of this server).
    pub fn config_for_port(&self, sub: &str, port: u16) -> SftpConfig {
        let url = format!("sftp://{}@127.0.0.1:{}{}", self.user, port, self.path(sub).display());
        let mut cfg = SftpConfig::from_url(&url).expect("url");
        cfg.use_agent = false;
        cfg.identity = Some(self.user_key.clone());
        cfg.host_keys = HostKeyPolicy::Fingerprints(vec![self.fingerprint.clone()]);
        cfg.retries = 3;
        cfg.retry_wait = Duration::from_millis(50);
        // Enough to stripe large files over several channels, few enough to keep tests light.
        cfg.connections = 3;
        cfg
    }

    pub fn sink(&self, sub: &str) -> Arc<dyn Sink> {
        self.sink_with(self.config(sub), TargetOptions::default())
    }

    pub fn sink_with(&self, cfg: SftpConfig, target: TargetOptions) -> Arc<dyn Sink> {
        Arc::new(SftpSink::new(cfg, target).expect("valid sftp config"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Appends a public key to `authorized_keys` (read on every login).
    pub fn authorize(&self, private_key: &Path) {
        use std::io::Write;
        let mut f =
            std::fs::OpenOptions::new().append(true).open(self.dir.path().join("authorized_keys")).expect("open");
        f.write_all(public_key(private_key).as_bytes()).expect("append");
    }
}

/// How many processes hold `path` open (from /proc/*/fd): on the server side of a test, one
/// sftp-server per SFTP channel writing the file.
pub fn processes_with_open(path: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|fds| fds.filter_map(|f| f.ok()).any(|f| std::fs::read_link(f.path()).is_ok_and(|t| t == path)))
                .unwrap_or(false)
        })
        .count()
}

/// PIDs whose parent is `pid`, from /proc/PID/stat (field 4, after the parenthesised name).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.to_string()))
                .and_then(|rest| rest.split_whitespace().nth(1).and_then(|pp| pp.parse::<u32>().ok()))
                == Some(pid)
        })
        .collect()
}

/// Waits until the server answers with its SSH banner, or the process died.
fn wait_for_banner(port: u16, child: &mut Child) -> bool {
    use std::io::Read;
    for _ in 0..200 {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 8];
            if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"SSH-2.0") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

impl Sshd {
    /// Stops the server and every connection to it, keeping its files for inspection.
    /// sshd puts each connection in a session of its own (setsid), so killing the process
    /// group is not enough: the listener's descendants are found in /proc and killed by PID.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let mut pids = vec![self.child.id()];
            let mut i = 0;
            while i < pids.len() {
                pids.extend(children_of(pids[i]));
                i += 1;
            }
            let mut kill = Command::new("kill");
            kill.arg("-KILL").arg("--");
            for pid in &pids {
                kill.arg(pid.to_string());
            }
            let _ = kill.stderr(Stdio::null()).status();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
