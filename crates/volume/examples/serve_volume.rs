//! Serve a backing file over NBD with write tracking: the volume crate's Tracker as the
//! export's write observer and its `cutover:dirty` metadata context. For trying it by hand
//! and for the crash test, which kills it with SIGKILL mid-stream:
//!
//! ```sh
//! truncate -s 256M /tmp/disk.img
//! cargo run -p volume --example serve_volume -- /tmp/disk.img /tmp/disk.md /tmp/nbd.sock --create
//! qemu-io -f raw -c 'write -P 0x5a 1M 64k' 'nbd+unix:///?socket=/tmp/nbd.sock'
//! nbdinfo --map=cutover:dirty 'nbd+unix:///?socket=/tmp/nbd.sock'
//! ```
//!
//! Arguments: BACKING META SOCKET [NAME] [--create] [--block-size=BYTES]
//! [--al-extents=N]. `--create` makes the metadata if the file does not exist. It prints
//! `ready` once the socket listens, then reads commands on stdin, one per line, and
//! answers each with one line: `mark` (`marked BLOCKS BYTES FROM_GEN TO_GEN`), `flush`
//! (`flushed PAGES`), `status` (the status, debug-printed), `close` (closes the metadata
//! cleanly and exits).

use nbd::{Export, FileBackend};
use std::io::BufRead;
use std::sync::Arc;
use volume::{CreateOptions, Meta};

fn usage() -> ! {
    eprintln!(
        "usage: serve_volume BACKING META SOCKET [NAME] [--create] [--block-size=BYTES] \
         [--al-extents=N]"
    );
    std::process::exit(2);
}

fn option(args: &[String], name: &str) -> Option<u64> {
    let prefix = format!("--{name}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix))
        .map(|v| v.parse().unwrap_or_else(|_| usage()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let (Some(backing), Some(meta_path), Some(socket)) = (pos.first(), pos.get(1), pos.get(2))
    else {
        usage()
    };
    let name = pos.get(3).map_or("", |s| s.as_str());
    let backend = Arc::new(FileBackend::open(backing.as_str(), false)?);
    let size = nbd::Backend::size(&*backend);

    if args.iter().any(|a| a == "--create") && !std::path::Path::new(meta_path.as_str()).exists() {
        let mut opts = CreateOptions::new(size);
        if let Some(bs) = option(&args, "block-size") {
            opts.block_size = u32::try_from(bs).unwrap_or_else(|_| usage());
        }
        if let Some(n) = option(&args, "al-extents") {
            opts.al_extents = u32::try_from(n).unwrap_or_else(|_| usage());
        }
        let info = Meta::create_with(meta_path.as_str(), &opts)?;
        eprintln!("created metadata for volume {}", info.volume_id);
    }
    let meta = Meta::open(meta_path.as_str(), size)?;
    eprintln!("{:?}", meta.open_report());
    let tracker = meta.tracker();

    let mut export = Export::new(name, backend);
    export.description = format!("{backing} tracked in {meta_path}");
    export.observer = Some(tracker.clone());
    export.meta.push(tracker);
    let listener = tokio::net::UnixListener::bind(socket.as_str())?;
    println!("ready");

    // Commands on stdin, answered on stdout, from a plain thread (they block on I/O).
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match line.trim() {
                "mark" => match meta.mark() {
                    Ok(s) => println!(
                        "marked {} {} {:#x} {:#x}",
                        s.blocks(),
                        s.bytes(),
                        s.from_gen,
                        s.to_gen
                    ),
                    Err(e) => println!("error {e}"),
                },
                "flush" => match meta.flush() {
                    Ok(n) => println!("flushed {n}"),
                    Err(e) => println!("error {e}"),
                },
                "status" => println!("{:?}", meta.status()),
                "close" => {
                    let code = match meta.close() {
                        Ok(()) => 0,
                        Err(e) => {
                            eprintln!("{e}");
                            1
                        }
                    };
                    println!("closed");
                    std::process::exit(code);
                }
                other => println!("error unknown command {other:?}"),
            }
        }
    });
    nbd::Server::new(vec![export])
        .serve_unix_listener(listener)
        .await?;
    Ok(())
}
