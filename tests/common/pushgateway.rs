//! A real Prometheus Pushgateway (Debian's `prometheus-pushgateway`, installed by
//! scripts/test.sh) on 127.0.0.1 for the duration of a test, stopped on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Pushgateway {
    child: Child,
    pub url: String,
}

impl Pushgateway {
    pub async fn start() -> Pushgateway {
        let port = super::free_port();
        let child = Command::new("prometheus-pushgateway")
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-pushgateway is installed (scripts/test.sh installs it)");
        let gw = Pushgateway { child, url: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/-/ready", gw.url)).await
                && r.status().is_success()
            {
                return gw;
            }
            assert!(Instant::now() < deadline, "pushgateway did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the Pushgateway exposes to Prometheus.
    pub async fn scrape(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url)).await.unwrap().text().await.unwrap()
    }
}

impl Drop for Pushgateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
