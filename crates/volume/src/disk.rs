//! How the metadata file is read and written: positional reads and writes and a durability
//! barrier, behind a small trait so that the power-cut tests can record every write and
//! every barrier and rebuild the file as a crash at any point would leave it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The metadata file as the rest of the crate sees it.
pub(crate) trait Disk: Send + Sync + 'static {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (`fdatasync`: the file's length never changes
    /// after creation, so the inode's metadata need not be flushed with it).
    fn sync(&self) -> io::Result<()>;
}

impl Disk for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}
