//! Serve one file (or block device) over NBD on a Unix socket, for trying the server with
//! real clients by hand:
//!
//! ```sh
//! truncate -s 64M /tmp/disk.img
//! cargo run -p nbd --example serve_file -- /tmp/disk.img /tmp/nbd.sock disk
//! qemu-io -f raw -c 'write -P 0xab 0 1M' 'nbd+unix:///disk?socket=/tmp/nbd.sock'
//! nbdinfo --map 'nbd+unix:///disk?socket=/tmp/nbd.sock'
//! ```
//!
//! Arguments: FILE SOCKET [NAME] [--read-only]. The socket path must not exist.

use nbd::{Export, FileBackend};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let read_only = args.iter().any(|a| a == "--read-only");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let (Some(file), Some(socket)) = (pos.first(), pos.get(1)) else {
        eprintln!("usage: serve_file FILE SOCKET [NAME] [--read-only]");
        std::process::exit(2);
    };
    let name = pos.get(2).map_or("", |s| s.as_str());
    let mut export = Export::new(name, Arc::new(FileBackend::open(file, read_only)?));
    export.read_only = read_only;
    export.description = format!("{file} served by cutover's nbd crate");
    eprintln!("serving {file} as {name:?} on {socket}");
    nbd::serve_unix(socket.as_str(), vec![export]).await?;
    Ok(())
}
