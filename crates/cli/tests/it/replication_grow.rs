//! A link grows: through `wanem.py` capping every TCP flow at 2 MB/s, a link that starts
//! with one data connection doubles them while each doubling raises its rate, so the
//! initial sync of a 64 MiB volume ends long before one flow alone could carry it.

use crate::replication::{configure, have_qemu, node, volume, wait_in_step, SIZE};
use crate::util::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `wanem.py` relaying to `target` with `args`; killed on drop.
pub(crate) struct Wanem(Child, pub(crate) u16);

impl Wanem {
    pub(crate) fn start(dir: &std::path::Path, target: u16, args: &[&str]) -> Wanem {
        let port_file = dir.join("wanem.port");
        let child = Command::new("python3")
            .arg(mkdata_path().with_file_name("wanem.py"))
            .args(["--listen", "127.0.0.1:0", "--port-file", s(&port_file)])
            .args(["--target", &format!("127.0.0.1:{target}")])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 wanem.py");
        let start = Instant::now();
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break p;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "wanem did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Wanem(child, port)
    }
}

impl Wanem {
    /// Stop it (SIGTERM) and return what it wrote to its `--stats` file, `stats`.
    pub(crate) fn stats(mut self, stats: &std::path::Path) -> serde_json::Value {
        let pid = rustix::process::Pid::from_child(&self.0);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill wanem");
        let _ = self.0.wait();
        let text = std::fs::read_to_string(stats).expect("wanem's stats");
        serde_json::from_str(&text).expect("wanem's stats are JSON")
    }
}

impl Drop for Wanem {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_link_through_capped_flows_grows_its_connections() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let a = node(t.path(), "a");
    let b = node(t.path(), "b");
    let data: Vec<u8> = (0..SIZE as usize)
        .map(|i| (i * 7 + (i >> 12)) as u8)
        .collect();
    std::fs::write(&a.image, &data).unwrap();
    configure(&b, "a", &a.fingerprint, "");
    volume(&b, &["create-md", "db"]).ok();
    let db = Daemon::start_with(&b.dir, &b.config);
    let wan = Wanem::start(t.path(), db.port, &["--flow-mbps", "2", "--rtt-ms", "10"]);
    configure(
        &a,
        "b",
        &b.fingerprint,
        &format!(
            "address = \"127.0.0.1:{}\"\nconnections = 1\nmax_connections = 16\n",
            wan.1
        ),
    );
    volume(&a, &["create-md", "db"]).ok();
    let da = Daemon::start_with(&a.dir, &a.config);
    let started = Instant::now();
    volume(&a, &["primary", "db", "--force"]).ok();
    let st = wait_in_step(&a, &b, "the initial sync through capped flows");
    let took = started.elapsed();
    let conns = st["peers"][0]["connections"].as_u64().unwrap();
    assert!(
        conns >= 4,
        "the link did not grow: {conns} data connection(s)"
    );
    // One 2 MB/s flow needs 33 s for 64 MiB.
    assert!(
        took < Duration::from_secs(25),
        "took {took:?} with {conns} connections"
    );
    assert!(std::fs::read(&b.image).unwrap() == data);
    drop(da);
    drop(db);
}
