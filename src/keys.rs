//! age keys: making a new identity, reading identity files (refusing ones that others can
//! read), and parsing recipients. The backup host needs only recipients (public keys);
//! identities are for restores and drills.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use age::secrecy::ExposeSecret;
use chrono::Utc;

use crate::error::{Error, ErrorKind, Result};

/// An identity that can decrypt what was encrypted to its recipient.
pub type Identity = Box<dyn age::Identity + Send + Sync>;

/// Writes a new X25519 identity to `path` (mode 0600, never over an existing file) and
/// returns its recipient.
pub fn keygen(path: &Path) -> Result<String> {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            let error = Error::new(
                ErrorKind::Target,
                format!("unable to create identity file '{}'", path.display()),
            );
            match e.kind() {
                std::io::ErrorKind::AlreadyExists => error
                    .with_hint("an identity file is never replaced: losing a key loses every backup encrypted to it only; choose another path"),
                _ => error.with_source(e),
            }
        })?;
    let text = format!(
        "# created: {}\n# public key: {recipient}\n{}\n",
        Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        identity.to_string().expose_secret()
    );
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            Error::new(
                ErrorKind::Target,
                format!("unable to write identity file '{}'", path.display()),
            )
            .with_source(e)
        })?;
    Ok(recipient)
}

/// An age recipient (`age1…`), or why it is not one.
pub fn parse_recipient(text: &str) -> std::result::Result<age::x25519::Recipient, String> {
    text.trim()
        .parse::<age::x25519::Recipient>()
        .map_err(|e| format!("not an age recipient (\"{}\"): {e}", text.trim()))
}

/// The identities in `path`. A file that group or others can read is refused: a secret key
/// anyone on the host can copy protects nothing.
pub fn load_identities(path: &Path) -> Result<Vec<Identity>> {
    let unreadable = |e: std::io::Error| {
        Error::new(
            ErrorKind::Config,
            format!("unable to read identity file '{}'", path.display()),
        )
        .with_source(e)
    };
    let mode = std::fs::metadata(path)
        .map_err(unreadable)?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "refusing identity file '{}': it is readable by group or others (mode {:04o})",
                path.display(),
                mode & 0o7777
            ),
        )
        .with_hint(format!("run `chmod 600 {}`", path.display())));
    }
    let file = age::IdentityFile::from_file(path.display().to_string()).map_err(unreadable)?;
    let identities = file.into_identities().map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("unable to use identity file '{}': {e}", path.display()),
        )
    })?;
    if identities.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("identity file '{}' holds no identity", path.display()),
        )
        .with_hint("`lifeboat keygen --output FILE` writes one"));
    }
    Ok(identities)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_new_identity_decrypts_what_is_encrypted_to_its_recipient() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.txt");
        let recipient = keygen(&path).unwrap();
        assert!(recipient.starts_with("age1"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("# public key: {recipient}")));

        let encrypted = age::encrypt(&parse_recipient(&recipient).unwrap(), b"rows").unwrap();
        let identities = load_identities(&path).unwrap();
        let decryptor = age::Decryptor::new(&encrypted[..]).unwrap();
        let mut plain = Vec::new();
        decryptor
            .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .unwrap()
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, b"rows");

        // Never over an existing key.
        let again = keygen(&path).unwrap_err();
        assert!(again.message().contains("unable to create identity file"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn an_identity_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.txt");
        keygen(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let Err(err) = load_identities(&path) else {
            panic!("a 0640 identity file was accepted");
        };
        assert!(
            err.message()
                .contains("readable by group or others (mode 0640)"),
            "{}",
            err.message()
        );
        assert_eq!(
            err.hints()[0],
            format!("run `chmod 600 {}`", path.display())
        );
    }

    #[test]
    fn recipients_are_checked() {
        assert!(
            parse_recipient("age1notakey")
                .unwrap_err()
                .contains("not an age recipient")
        );
        let dir = tempfile::tempdir().unwrap();
        let recipient = keygen(&dir.path().join("k")).unwrap();
        assert!(parse_recipient(&format!(" {recipient}\n")).is_ok());
    }
}
