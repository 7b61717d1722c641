//! age keys: making a new identity, reading identity files (refusing ones that others can
//! read), and parsing recipients. The backup host needs only recipients (public keys);
//! identities are for restores and drills.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use age::secrecy::ExposeSecret;
use age_core::format::{FileKey, Stanza};
use chrono::Utc;
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};

/// An identity that can decrypt what was encrypted to its recipient.
pub type Identity = Box<dyn age::Identity + Send + Sync>;

/// The environment variable naming an identity file; it wins over `identity_file`.
pub const IDENTITY_ENV: &str = "LIFEBOAT_IDENTITY_FILE";

/// What `ObjectEntry::encryption` says of an age-encrypted object.
pub const AGE: &str = "age";

/// The public keys objects are encrypted to.
#[derive(Clone)]
pub struct Recipients {
    keys: Arc<Vec<age::x25519::Recipient>>,
    texts: Arc<Vec<String>>,
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.texts.iter()).finish()
    }
}

impl Recipients {
    pub fn parse(texts: &[String]) -> std::result::Result<Recipients, String> {
        let keys = texts
            .iter()
            .map(|t| parse_recipient(t))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Recipients {
            keys: Arc::new(keys),
            texts: Arc::new(texts.iter().map(|t| t.trim().to_string()).collect()),
        })
    }

    /// The recipients as `age1…` strings, as configured: what a manifest records.
    pub fn texts(&self) -> &[String] {
        &self.texts
    }

    /// The same set whatever the order: a short name for it (the first 16 hex digits of the
    /// sha256 of the sorted keys).
    pub fn fingerprint(&self) -> String {
        set_fingerprint(&self.texts)
    }

    /// An encryptor to every recipient, with `note` (if any) as an extra header stanza that
    /// decryptors ignore (see `WalNote`).
    pub fn encryptor(&self, note: Option<&WalNote>) -> io::Result<age::Encryptor> {
        let mut all: Vec<&dyn age::Recipient> =
            self.keys.iter().map(|k| k as &dyn age::Recipient).collect();
        if let Some(note) = note {
            all.push(note);
        }
        age::Encryptor::with_recipients(all.into_iter()).map_err(io::Error::other)
    }
}

/// The fingerprint of a set of recipients given as text; see `Recipients::fingerprint`.
pub fn set_fingerprint(texts: &[String]) -> String {
    let mut sorted: Vec<&str> = texts.iter().map(|t| t.trim()).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let digest = Sha256::digest(sorted.join("\n").as_bytes());
    hex::encode(&digest[..8])
}

/// A header stanza `-> lifeboat-wal RAW_SHA256 RECIPIENTS_FINGERPRINT` in an encrypted WAL
/// object. WAL objects have no manifest, and the archiving host holds no identity; this is
/// how `wal-push` tells the same segment pushed again from a different one, and `rekey`
/// which set of keys an object is encrypted to, without decrypting. age implementations
/// skip stanzas they do not know, and the header MAC covers it.
pub struct WalNote {
    pub raw_sha256: String,
    pub fingerprint: String,
}

const WAL_NOTE_TAG: &str = "lifeboat-wal";

impl age::Recipient for WalNote {
    fn wrap_file_key(
        &self,
        _file_key: &FileKey,
    ) -> std::result::Result<(Vec<Stanza>, HashSet<String>), age::EncryptError> {
        let stanza = Stanza {
            tag: WAL_NOTE_TAG.to_string(),
            args: vec![self.raw_sha256.clone(), self.fingerprint.clone()],
            body: Vec::new(),
        };
        Ok((vec![stanza], HashSet::new()))
    }
}

/// The age header at the start of `stored` has this many bytes at most, for any sane
/// number of recipients.
pub const HEADER_READ: u64 = 16 * 1024;

/// The `WalNote` in the age header at the start of `stored`, if it has one.
pub fn read_wal_note(stored: &[u8]) -> Option<WalNote> {
    let text = &stored[..stored.len().min(HEADER_READ as usize)];
    let mut lines = text.split(|b| *b == b'\n');
    if lines.next()? != b"age-encryption.org/v1" {
        return None;
    }
    for line in lines {
        if line.starts_with(b"---") {
            break;
        }
        let line = std::str::from_utf8(line).ok()?;
        let mut words = line.split(' ');
        if words.next() == Some("->") && words.next() == Some(WAL_NOTE_TAG) {
            let raw_sha256 = words.next()?.to_string();
            let fingerprint = words.next()?.to_string();
            return Some(WalNote {
                raw_sha256,
                fingerprint,
            });
        }
    }
    None
}

/// Whether `stored` starts like an age file.
pub fn is_age(stored: &[u8]) -> bool {
    stored.starts_with(b"age-encryption.org/v1\n")
}

/// Why an age stream could not be opened with the identities at hand.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// None of the identities matches a recipient of the object.
    #[error("the identity does not match any recipient the object was encrypted to")]
    NoMatchingKey,
    /// The header is damaged or not age at all.
    #[error("not a readable age file: {0}")]
    Damaged(String),
}

/// The plaintext of the age stream `stored`, decrypted with the first of `identities` that
/// matches one of its recipients.
pub fn open<R: Read>(
    stored: R,
    identities: &[Identity],
) -> std::result::Result<age::stream::StreamReader<R>, OpenError> {
    let decryptor = age::Decryptor::new(stored).map_err(|e| OpenError::Damaged(e.to_string()))?;
    decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => OpenError::NoMatchingKey,
            other => OpenError::Damaged(other.to_string()),
        })
}

/// Where the identities for reading encrypted objects come from, loaded on first use: a
/// command that meets no encrypted object never reads the file.
#[derive(Clone, Default)]
pub struct Keyring {
    source: Option<(PathBuf, String)>,
    loaded: Arc<Mutex<Option<Arc<Vec<Identity>>>>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({})", self.describe())
    }
}

impl Keyring {
    /// `LIFEBOAT_IDENTITY_FILE` if set, else the configured `identity_file`, else none.
    pub fn from_env_or(identity_file: Option<PathBuf>) -> Keyring {
        if let Some(path) = std::env::var_os(IDENTITY_ENV).filter(|p| !p.is_empty()) {
            return Keyring::from_file(PathBuf::from(path), IDENTITY_ENV);
        }
        match identity_file {
            Some(path) => Keyring::from_file(path, "identity_file in [encryption]"),
            None => Keyring::default(),
        }
    }

    /// The identity file at `path`; `origin` says where it was named, for messages.
    pub fn from_file(path: PathBuf, origin: &str) -> Keyring {
        Keyring {
            source: Some((path, origin.to_string())),
            loaded: Arc::default(),
        }
    }

    pub fn has_identity(&self) -> bool {
        self.source.is_some()
    }

    /// The identity file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.source.as_ref().map(|(path, _)| path.as_path())
    }

    /// "identity file 'PATH' (from ORIGIN)", or that there is none.
    pub fn describe(&self) -> String {
        match &self.source {
            Some((path, origin)) => format!("identity file '{}' (from {origin})", path.display()),
            None => "no identity file".to_string(),
        }
    }

    /// The identities, read once. `what` names what needs them, for the error when no
    /// identity file is configured.
    pub fn identities(&self, what: &str) -> Result<Arc<Vec<Identity>>> {
        let Some((path, _)) = &self.source else {
            return Err(Error::new(
                ErrorKind::Key,
                format!("unable to decrypt {what}: it is encrypted with age and no identity file is configured"),
            )
            .with_hint(format!("set {IDENTITY_ENV}=/path/to/key.txt, or identity_file in [encryption], to an identity whose public key is one of the recipients the manifest lists")));
        };
        let mut loaded = self.loaded.lock().expect("keyring lock");
        if let Some(identities) = loaded.as_ref() {
            return Ok(identities.clone());
        }
        let identities = Arc::new(load_identities(path)?);
        *loaded = Some(identities.clone());
        Ok(identities)
    }

    /// The error for an object none of the identities can open.
    pub fn no_match(&self, what: &str, recipients: &[String]) -> Error {
        let mut error = Error::new(
            ErrorKind::Key,
            format!(
                "unable to decrypt {what}: the key in {} does not match any recipient it was encrypted to",
                self.describe()
            ),
        );
        if !recipients.is_empty() {
            error = error.with_hint(format!(
                "it was encrypted to: {}; use the identity of one of them",
                recipients.join(", ")
            ));
        }
        error
    }
}

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
    let text = text.trim();
    let lower = text.to_ascii_lowercase();
    if let Some(kind) = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-",
        "sk-ssh-",
        "sk-ecdsa-",
        "ssh-dss",
    ]
    .into_iter()
    .find(|kind| lower.starts_with(kind))
    {
        let kind = text.split_whitespace().next().unwrap_or(kind);
        return Err(format!(
            "an {kind} SSH key is not a recipient lifeboat encrypts to (\"{}…\"): it takes age X25519 recipients (age1…), made with `lifeboat keygen --output FILE`",
            text.chars().take(24).collect::<String>()
        ));
    }
    text.parse::<age::x25519::Recipient>()
        .map_err(|e| format!("not an age recipient (\"{text}\"): {e}"))
}

/// The public keys (age1…) of the X25519 identities in the identity file `path`, the
/// file checked as `load_identities` checks it.
pub fn public_keys_of(path: &Path) -> Result<Vec<String>> {
    load_identities(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("unable to read identity file '{}'", path.display()),
        )
        .with_source(e)
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("AGE-SECRET-KEY-"))
        .filter_map(|line| line.parse::<age::x25519::Identity>().ok())
        .map(|identity| identity.to_public().to_string())
        .collect())
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
    let metadata = std::fs::metadata(path).map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "unable to use identity file '{}': it is not a file",
                path.display()
            ),
        )
        .with_hint("point it at the file `lifeboat keygen --output FILE` wrote"));
    }
    let mode = metadata.permissions().mode();
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
    // `age -p` output, or `age-keygen | age -p -a`: an identity kept under a passphrase.
    let mut start = [0u8; 64];
    let read = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut start))
        .map_err(unreadable)?;
    let start = String::from_utf8_lossy(&start[..read]);
    if start.starts_with("age-encryption.org/")
        || start.starts_with("-----BEGIN AGE ENCRYPTED FILE-----")
    {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "unable to use identity file '{}': it is itself encrypted (with a passphrase or to another key), and lifeboat runs unattended and asks for none",
                path.display()
            ),
        )
        .with_hint(format!(
            "decrypt it for the restore into a file only you can read (`age -d -o key.txt {}`, with `-i KEY` if it was encrypted to a key; then chmod 600), point {IDENTITY_ENV} at that, and remove it afterwards",
            path.display()
        )));
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
    fn ssh_keys_are_refused_by_name() {
        let err = parse_recipient("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@host").unwrap_err();
        assert!(
            err.starts_with("an ssh-ed25519 SSH key is not a recipient"),
            "{err}"
        );
        assert!(err.contains("age1"), "{err}");
        let err = parse_recipient("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ").unwrap_err();
        assert!(err.starts_with("an ssh-rsa SSH key"), "{err}");
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

    #[test]
    fn a_wal_note_is_read_without_a_key_and_ignored_by_decryption() {
        let identity = age::x25519::Identity::generate();
        let recipients = Recipients::parse(&[identity.to_public().to_string()]).unwrap();
        let note = WalNote {
            raw_sha256: "ab".repeat(32),
            fingerprint: recipients.fingerprint(),
        };
        let mut sealed = Vec::new();
        let mut writer = recipients
            .encryptor(Some(&note))
            .unwrap()
            .wrap_output(&mut sealed)
            .unwrap();
        writer.write_all(b"segment").unwrap();
        writer.finish().unwrap();

        assert!(is_age(&sealed));
        let read = read_wal_note(&sealed).unwrap();
        assert_eq!(read.raw_sha256, note.raw_sha256);
        assert_eq!(read.fingerprint, recipients.fingerprint());
        let identities: Vec<Identity> = vec![Box::new(identity)];
        let mut plain = Vec::new();
        open(&sealed[..], &identities)
            .unwrap()
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, b"segment");
        let strangers: Vec<Identity> = vec![Box::new(age::x25519::Identity::generate())];
        assert!(matches!(
            open(&sealed[..], &strangers),
            Err(OpenError::NoMatchingKey)
        ));
        // The same set in another order has the same fingerprint.
        let other = age::x25519::Identity::generate().to_public().to_string();
        let texts = recipients.texts().to_vec();
        let both = [texts[0].clone(), other.clone()];
        let reversed = [other, texts[0].clone()];
        assert_eq!(set_fingerprint(&both), set_fingerprint(&reversed));
        assert_ne!(set_fingerprint(&both), recipients.fingerprint());
    }
}
