//! This host, as every record lifeboat leaves says it: claims, locks, manifests, journals,
//! drill reports. Low in the layers, so that none of them reaches into a command for it.

/// The host's name, or "unknown" where the system gives none that is text.
pub fn name() -> String {
    hostname::get()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "unknown".to_string())
}
