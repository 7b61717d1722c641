//! Sources: what produces the raw bytes of a backup's objects. Each source runs on a
//! blocking thread and writes into the pipeline's `Write`.

pub mod files;
pub mod postgres;
pub mod process;
pub mod redis;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// A password from a file of its own: refused unless only its owner can read it.
pub(crate) fn read_password_file(path: &Path) -> Result<String> {
    let what = format!("password file '{}'", path.display());
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::config(format!("unable to read {what}")).with_source(e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::config(format!(
            "unable to use {what}: it is readable by group or others (mode {mode:04o})"
        ))
        .with_hint(format!("run `chmod 600 {}`", path.display())));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::config(format!("unable to read {what}")).with_source(e))?;
    let password = text.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err(Error::config(format!("unable to use {what}: it is empty")));
    }
    Ok(password)
}
