//! Files that hold secrets: the WireGuard private key, the IPsec pre-shared keys
//! (`encryption.ipsec.key_file`), a cluster's bearer token (`token_file`). All are read here, so
//! each gets the same protection, and none is ever quoted in a message.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use tracing::warn;

/// Reads the secret file at `path` (`what` names it in messages). A file group or others may
/// read is first made 0600, with a warning; where that is impossible (a read-only file system,
/// as /etc is under the systemd unit) it is refused: a key others can read is no secret, and
/// `chmod 600` is the operator's fix. The text comes back as it is in the file.
pub fn read(path: &Path, what: &str) -> Result<String> {
    // Non-blocking: a FIFO put in the key's place must not hang the daemon on open.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("reading the {what} {}", path.display()))?;
    // The descriptor's metadata and mode: the file checked is the file read.
    let meta = file
        .metadata()
        .with_context(|| format!("reading the {what} {}", path.display()))?;
    if !meta.is_file() {
        bail!("the {what} {} is not a regular file", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| {
                format!(
                    "the {what} {} is readable by group or others (mode {mode:04o}) and gatewayd cannot \
                     change that; run `chmod 600 {}`",
                    path.display(),
                    path.display()
                )
            })?;
        warn!(path = %path.display(), "the {what} was readable by group or others (mode {mode:04o}): set to 0600");
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("reading the {what} {}", path.display()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_readable_by_others_is_made_0600_and_read() {
        let dir = std::env::temp_dir().join(format!("gd-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, "1 00112233445566778899aabbccddeeff\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = read(&path, "IPsec key file").unwrap();
        assert_eq!(text, "1 00112233445566778899aabbccddeeff\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let e = read(&dir, "IPsec key file").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = format!("{:#}", read(&dir.join("missing"), "token file").unwrap_err());
        assert!(
            e.contains("reading the token file") && e.contains("missing"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
