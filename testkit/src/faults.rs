//! Disk faults for real member processes.
//!
//! [`eio_shim`] builds a small `LD_PRELOAD` library (`eio_shim.c`) that makes
//! `fsync`/`fdatasync` fail with `EIO` once a trigger file exists: the member runs
//! normally until the test creates the file, then every flush fails, as on a disk
//! whose write-back failed. No test hook is compiled into concord itself.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The shim's C source.
const EIO_SHIM_C: &str = include_str!("eio_shim.c");

/// Environment variable naming the trigger file the shim checks.
pub const EIO_TRIGGER_ENV: &str = "CONCORD_EIO_TRIGGER";

/// Compiles the shim into `dir` with the system C compiler (`cc`); returns the
/// path of the shared library to put in `LD_PRELOAD`.
pub fn eio_shim(dir: &Path) -> io::Result<PathBuf> {
    let src = dir.join("eio_shim.c");
    let lib = dir.join("libeio_shim.so");
    std::fs::write(&src, EIO_SHIM_C)?;
    let out = Command::new("cc").args(["-shared", "-fPIC", "-O1", "-o"]).arg(&lib).arg(&src).arg("-ldl").output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("cc eio_shim.c: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(lib)
}
