//! Link calibration: how fast wanem itself carries bulk bytes on this machine (1 flow, then
//! many flows, through the same options as the workloads), so the link targets can be read
//! against what the emulator can deliver here.

use crate::tools::{Env, Wanem};
use anyhow::{bail, Result};
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub flows: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub single: Phase,
    pub parallel: Phase,
    /// What wanem counted over both phases.
    pub wire_bytes: Option<u64>,
}

/// Send `each` bytes on each of `flows` connections to `port`, and time until the sink behind
/// `listener` has read every byte.
fn phase(listener: &TcpListener, port: u16, flows: usize, each: u64) -> Result<Phase> {
    let deadline = Duration::from_secs(120) + Duration::from_secs_f64(each as f64 / 1e5);
    listener.set_nonblocking(true)?;
    let start = Instant::now();
    let received = thread::scope(|sc| -> Result<u64> {
        let sink = sc.spawn(move || -> Result<u64> {
            let mut readers = Vec::new();
            while readers.len() < flows {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false)?;
                        s.set_read_timeout(Some(Duration::from_secs(60)))?;
                        readers.push(thread::spawn(move || -> Result<u64> {
                            let mut s = s;
                            let mut buf = vec![0u8; 1 << 16];
                            let mut n = 0u64;
                            loop {
                                let k = s.read(&mut buf)?;
                                if k == 0 {
                                    return Ok(n);
                                }
                                n += k as u64;
                            }
                        }));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if start.elapsed() > deadline {
                            bail!("only {} of {flows} flows arrived", readers.len());
                        }
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let mut total = 0;
            for r in readers {
                total += r
                    .join()
                    .map_err(|_| anyhow::anyhow!("sink thread panicked"))??;
            }
            Ok(total)
        });
        let mut senders = Vec::new();
        for _ in 0..flows {
            senders.push(sc.spawn(move || -> Result<()> {
                let mut s = TcpStream::connect(("127.0.0.1", port))?;
                let buf = vec![0u8; 1 << 16];
                let mut left = each;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    s.write_all(&buf[..k])?;
                    left -= k as u64;
                }
                s.shutdown(Shutdown::Write)?;
                Ok(())
            }));
        }
        for s in senders {
            s.join()
                .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
        }
        sink.join()
            .map_err(|_| anyhow::anyhow!("sink thread panicked"))?
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let bytes = each * flows as u64;
    if received != bytes {
        bail!("sent {bytes} bytes, sink read {received}");
    }
    Ok(Phase {
        flows,
        bytes,
        seconds,
        mb_per_s: bytes as f64 / seconds / 1e6,
    })
}

/// One flow for about 3 s of its cap, then `flows` flows carrying `total` bytes.
pub fn run(env: &Env, dir: &Path, flows: usize, total: u64) -> Result<Calibration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let sink_port = listener.local_addr()?.port();
    let wanem = Wanem::start(
        env,
        sink_port,
        dir,
        "calib-wanem",
        &dir.join("calib-wanem.log"),
    )?;
    let port = wanem.port;
    let one = ((env.link.flow_mbps.max(0.5) * 3e6) as u64).max(1 << 20);
    let single = phase(&listener, port, 1, one)?;
    let flows = flows.max(1);
    let parallel = phase(&listener, port, flows, (total / flows as u64).max(1 << 16))?;
    // The phases' own byte counts are the calibration; wanem's count only adds to it.
    let wire_bytes = match wanem.finish() {
        Ok(count) => count.bytes_total,
        Err(e) => {
            eprintln!("  calibration: {e:#}");
            None
        }
    };
    Ok(Calibration {
        single,
        parallel,
        wire_bytes,
    })
}
