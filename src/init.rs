//! `lifeboat init`: writes the commented example config.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::EXAMPLE;
use crate::error::{Error, ErrorKind, Result};

pub struct InitOptions {
    pub path: PathBuf,
    pub force: bool,
}

pub fn run(options: &InitOptions) -> Result<PathBuf> {
    let path = &options.path;
    if path.exists() && !options.force {
        return Err(Error::usage(format!(
            "unable to write config file '{}': it already exists",
            path.display()
        ))
        .with_hint("edit it, or pass --force to replace it with the example"));
    }
    let write_error = |e: std::io::Error| {
        Error::new(
            ErrorKind::Target,
            format!("unable to write config file '{}'", path.display()),
        )
        .with_source(e)
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(write_error)?;
    }
    // The config names credential files and hosts: readable by its owner and group only.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(Path::new(path))
        .map_err(write_error)?;
    file.write_all(EXAMPLE.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    Ok(path.clone())
}
