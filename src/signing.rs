//! Signed manifests: who wrote a backup, not only that it arrived intact. The manifest's own
//! seal (a sha256 inside it) detects accidents; anyone who can write to the bucket can
//! recompute it. With `[signing] key_file` a backup host signs every manifest it commits with
//! an Ed25519 key, in minisign's format, beside it as `manifest.json.minisig`
//! (`minisign -Vm manifest.json -P KEY` checks it without lifeboat). With `trusted_signers`,
//! every command that reads a manifest refuses one that is unsigned or signed by a key not
//! listed. Restore hosts need the public keys only.

use std::io::{Cursor, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use minisign::{KeyPair, PublicKey, SecretKey, SecretKeyBox, SignatureBox};

use crate::error::{Error, ErrorKind, Result};

/// The signature object beside an object: `manifest.json.minisig`.
pub fn signature_key(key: &str) -> String {
    format!("{key}.minisig")
}

/// The trusted comment of a signature of the object at `key` (relative to the repository).
fn signed_as(key: &str) -> String {
    format!("lifeboat {key}")
}

/// The most a signature file may be (minisign's are about 300 bytes).
pub const SIGNATURE_LIMIT: u64 = 4096;

/// A key id as minisign prints it: 16 hex digits of the little-endian key number.
fn key_id(keynum: &[u8]) -> String {
    let mut bytes = [0u8; 8];
    let n = keynum.len().min(8);
    bytes[..n].copy_from_slice(&keynum[..n]);
    format!("{:016X}", u64::from_le_bytes(bytes))
}

/// Makes a signing key at `path` (mode 0600, never replacing a file) and its public key at
/// `path.pub`; returns the public key as `trusted_signers` and `minisign -P` take it.
pub fn keygen(path: &Path) -> Result<String> {
    let KeyPair { pk, sk } = KeyPair::generate_unencrypted_keypair().map_err(|e| {
        Error::new(ErrorKind::Target, "unable to generate a signing key").with_hint(e.to_string())
    })?;
    let public = pk.to_base64();
    let secret_box = sk.to_box(Some("lifeboat signing key")).map_err(|e| {
        Error::new(
            ErrorKind::Target,
            format!("unable to encode the signing key: {e}"),
        )
    })?;
    let public_box = pk.to_box().map_err(|e| {
        Error::new(
            ErrorKind::Target,
            format!("unable to encode the public key: {e}"),
        )
    })?;
    let write = |path: &Path, text: String, mode: u32| -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| {
                let error = Error::new(
                    ErrorKind::Target,
                    format!("unable to create key file '{}'", path.display()),
                );
                match e.kind() {
                    std::io::ErrorKind::AlreadyExists => error.with_hint(
                        "a key file is never replaced: backups signed by it verify only with its public key; choose another path",
                    ),
                    _ => error.with_source(e),
                }
            })?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| {
                Error::new(
                    ErrorKind::Target,
                    format!("unable to write key file '{}'", path.display()),
                )
                .with_source(e)
            })
    };
    let public_path = PathBuf::from(format!("{}.pub", path.display()));
    if public_path.exists() {
        return Err(Error::new(
            ErrorKind::Target,
            format!(
                "unable to create key file '{}': it exists",
                public_path.display()
            ),
        )
        .with_hint("a key file is never replaced; choose another path"));
    }
    let line_ended = |text: String| match text.ends_with('\n') {
        true => text,
        false => text + "\n",
    };
    write(path, line_ended(secret_box.into_string()), 0o600)?;
    write(&public_path, line_ended(public_box.into_string()), 0o644)?;
    Ok(public)
}

/// A public key from its base64 text (`RWQ…`), or why it is not one.
pub fn parse_public_key(text: &str) -> std::result::Result<PublicKey, String> {
    PublicKey::from_base64(text.trim())
        .map_err(|e| format!("not a minisign public key (\"{}\"): {e}", text.trim()))
}

/// The key a backup host signs with.
pub struct Signer {
    secret: SecretKey,
    public: PublicKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.key_id())
    }
}

impl Signer {
    /// Reads the signing key `lifeboat keygen --signing` wrote (an unencrypted minisign
    /// secret key).
    pub fn load(path: &Path) -> Result<Signer> {
        let fail = |why: String| {
            Error::new(
                ErrorKind::Usage,
                format!("unable to use signing key '{}': {why}", path.display()),
            )
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let secret = SecretKeyBox::from_string(&text)
            .and_then(SecretKeyBox::into_unencrypted_secret_key)
            .map_err(|e| fail(format!("not an unencrypted minisign secret key: {e}")))?;
        let public = PublicKey::from_secret_key(&secret).map_err(|e| fail(e.to_string()))?;
        Ok(Signer { secret, public })
    }

    pub fn public_key(&self) -> String {
        self.public.to_base64()
    }

    pub fn key_id(&self) -> String {
        key_id(self.public.keynum())
    }

    /// The signature file of `data`, the object at `key` (kept in the trusted comment, which
    /// the signature covers too, so that it holds there alone).
    pub fn sign(&self, data: &[u8], key: &str) -> Result<Vec<u8>> {
        let comment = signed_as(key);
        minisign::sign(
            Some(&self.public),
            &self.secret,
            Cursor::new(data),
            Some(&comment),
            Some(&format!("signature from lifeboat key {}", self.key_id())),
        )
        .map(|signature| signature.into_string().into_bytes())
        .map_err(|e| Error::new(ErrorKind::Usage, format!("unable to sign '{key}': {e}")))
    }
}

/// The keys whose signatures a reader accepts. Empty: signatures are not required.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    keys: Vec<(String, PublicKey)>,
}

/// Why a signed object is not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untrusted {
    Unsigned,
    /// Signed by a key not in `trusted_signers` (its id).
    OtherKey(String),
    /// Signed by a trusted key (its id), but not this content.
    Mismatch(String),
    /// A trusted key's (its id) signature of this content as another object (its key): a
    /// genuine object copied to where it does not belong.
    Elsewhere(String, String),
    /// The signature object is not a minisign signature.
    Unreadable(String),
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Untrusted::Unsigned => write!(f, "it is not signed and trusted_signers is set"),
            Untrusted::OtherKey(id) => write!(
                f,
                "it is signed by key {id}, which is not in trusted_signers"
            ),
            Untrusted::Mismatch(id) => write!(
                f,
                "its signature (key {id}) does not match it: it was changed after it was signed, or the signature is another object's"
            ),
            Untrusted::Elsewhere(id, signed_as) => write!(
                f,
                "it was signed (key {id}) as '{}', not as this object: a copy moved here",
                crate::error::escape_controls(signed_as)
            ),
            Untrusted::Unreadable(why) => write!(f, "its signature is unreadable: {why}"),
        }
    }
}

impl Trust {
    pub fn new(keys: Vec<PublicKey>) -> Trust {
        Trust {
            keys: keys
                .into_iter()
                .map(|key| (key_id(key.keynum()), key))
                .collect(),
        }
    }

    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn trusts(&self, public_key: &str) -> bool {
        self.keys
            .iter()
            .any(|(_, key)| key.to_base64() == public_key)
    }

    /// Whether `signature` is a trusted key's signature of `data` as the object at `key`
    /// (the trusted comment, which the signature covers, names it: a genuine signed object
    /// copied under another name is not trusted there); always so when no key is required.
    pub fn check(
        &self,
        data: &[u8],
        signature: Option<&[u8]>,
        key: &str,
    ) -> std::result::Result<(), Untrusted> {
        if !self.required() {
            return Ok(());
        }
        let Some(signature) = signature else {
            return Err(Untrusted::Unsigned);
        };
        let text = std::str::from_utf8(signature)
            .map_err(|_| Untrusted::Unreadable("not text".to_string()))?;
        let signature =
            SignatureBox::from_string(text).map_err(|e| Untrusted::Unreadable(e.to_string()))?;
        let id = key_id(signature.keynum());
        let Some((_, public)) = self.keys.iter().find(|(known, _)| *known == id) else {
            return Err(Untrusted::OtherKey(id));
        };
        minisign::verify(public, &signature, Cursor::new(data), true, false, false)
            .map_err(|_| Untrusted::Mismatch(id.clone()))?;
        match signature.trusted_comment() {
            Ok(comment) if comment == signed_as(key) => Ok(()),
            Ok(comment) => Err(Untrusted::Elsewhere(
                id,
                comment
                    .strip_prefix("lifeboat ")
                    .unwrap_or(&comment)
                    .to_string(),
            )),
            Err(e) => Err(Untrusted::Unreadable(e.to_string())),
        }
    }
}

impl From<Untrusted> for String {
    fn from(untrusted: Untrusted) -> String {
        untrusted.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_its_content_and_only_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let public = keygen(&path).unwrap();
        assert!(keygen(&path).is_err(), "a key file is never replaced");
        let signer = Signer::load(&path).unwrap();
        assert_eq!(signer.public_key(), public);
        let key = "jobs/a/backups/1/manifest.json";
        let signature = signer.sign(b"manifest", key).unwrap();
        let trust = Trust::new(vec![parse_public_key(&public).unwrap()]);
        assert_eq!(trust.check(b"manifest", Some(&signature), key), Ok(()));
        assert!(matches!(
            trust.check(b"manifesT", Some(&signature), key),
            Err(Untrusted::Mismatch(_))
        ));
        assert!(matches!(
            trust.check(b"manifest", Some(&signature), "jobs/a/backups/2/manifest.json"),
            Err(Untrusted::Elsewhere(_, signed)) if signed == key
        ));
        assert_eq!(
            trust.check(b"manifest", None, key),
            Err(Untrusted::Unsigned)
        );
        let other = dir.path().join("other.key");
        let other_public = keygen(&other).unwrap();
        let other_trust = Trust::new(vec![parse_public_key(&other_public).unwrap()]);
        assert!(matches!(
            other_trust.check(b"manifest", Some(&signature), key),
            Err(Untrusted::OtherKey(id)) if id == signer.key_id()
        ));
        assert!(matches!(
            trust.check(b"manifest", Some(b"garbage"), key),
            Err(Untrusted::Unreadable(_))
        ));
        assert_eq!(Trust::default().check(b"anything", None, key), Ok(()));
    }
}
