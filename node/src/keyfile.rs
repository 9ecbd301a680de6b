//! Secrets on disk, each in its own file of mode 0600, created on first use and checked on
//! every load (a file other users can read is refused):
//!
//! - the node key, `DATA_DIR/node.key` (the node's iroh endpoint key);
//! - a client identity (same format), `--identity FILE` or `~/.config/aspen/identity.key`;
//! - the node's bootstrap secret, `DATA_DIR/bootstrap.secret`: proof that a caller can read
//!   the node's data directory (to make it a cluster, admit it into one, or recover admin).

use std::io::Write;
use std::path::Path;

use aspen_trust::NodeKey;

/// File name of the node key inside the data directory.
pub const NODE_KEY_FILE: &str = "node.key";

/// Why the node key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: String,
        source: aspen_trust::KeyFileError,
    },
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: String, mode: u32 },
    #[error("{path}: not a bootstrap secret file: {why}")]
    Secret { path: String, why: String },
}

/// File name of the bootstrap secret inside the data directory.
pub const BOOTSTRAP_SECRET_FILE: &str = "bootstrap.secret";
/// First line of a bootstrap secret file.
pub const BOOTSTRAP_SECRET_HEADER: &str = "aspen-bootstrap-secret-v1";

/// Loads the node key from `dir`, creating it (0600, fsynced) if it does not exist.
pub fn load_or_create(dir: &Path) -> Result<NodeKey, KeyError> {
    load_or_create_key(&dir.join(NODE_KEY_FILE))
}

/// Loads a key file (node key or client identity), creating it if it does not exist.
pub fn load_or_create_key(path: &Path) -> Result<NodeKey, KeyError> {
    let shown = path.display().to_string();
    match read_private(path)? {
        Some(contents) => {
            NodeKey::from_file_contents(&contents).map_err(|source| KeyError::Format {
                path: shown,
                source,
            })
        }
        None => {
            let key = NodeKey::generate();
            write_private(path, &key.to_file_contents())?;
            Ok(key)
        }
    }
}

/// Loads an existing key file (never creates one).
pub fn load_key(path: &Path) -> Result<NodeKey, KeyError> {
    let shown = path.display().to_string();
    match read_private(path)? {
        Some(contents) => {
            NodeKey::from_file_contents(&contents).map_err(|source| KeyError::Format {
                path: shown,
                source,
            })
        }
        None => Err(KeyError::Read {
            path: shown,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        }),
    }
}

/// Loads the node's bootstrap secret from `dir`, creating it if it does not exist.
pub fn load_or_create_bootstrap_secret(dir: &Path) -> Result<[u8; 32], KeyError> {
    let path = dir.join(BOOTSTRAP_SECRET_FILE);
    match read_private(&path)? {
        Some(contents) => parse_bootstrap_secret(&path, &contents),
        None => {
            let secret: [u8; 32] = rand::random();
            write_private(
                &path,
                &format!("{BOOTSTRAP_SECRET_HEADER}\n{}\n", hex::encode(secret)),
            )?;
            Ok(secret)
        }
    }
}

/// Reads a bootstrap secret: from `DATA_DIR/bootstrap.secret` when `path` is a directory.
pub fn read_bootstrap_secret(path: &Path) -> Result<[u8; 32], KeyError> {
    let path = if path.is_dir() {
        path.join(BOOTSTRAP_SECRET_FILE)
    } else {
        path.to_path_buf()
    };
    let contents = std::fs::read_to_string(&path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_bootstrap_secret(&path, &contents)
}

fn parse_bootstrap_secret(path: &Path, contents: &str) -> Result<[u8; 32], KeyError> {
    let bad = |why: String| KeyError::Secret {
        path: path.display().to_string(),
        why,
    };
    let mut lines = contents.lines();
    if lines.next().map(str::trim) != Some(BOOTSTRAP_SECRET_HEADER) {
        return Err(bad(format!(
            "does not start with '{BOOTSTRAP_SECRET_HEADER}'"
        )));
    }
    let hex_line = lines.next().unwrap_or("").trim();
    let mut secret = [0u8; 32];
    if hex_line.len() != 64 || hex::decode_to_slice(hex_line, &mut secret).is_err() {
        return Err(bad("the secret is not 64 hex digits".into()));
    }
    if lines.any(|l| !l.trim().is_empty()) {
        return Err(bad("unexpected trailing data".into()));
    }
    Ok(secret)
}

/// Reads a private file: `None` if it does not exist; refused if others may read it.
fn read_private(path: &Path) -> Result<Option<String>, KeyError> {
    let shown = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(contents) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path)
                    .map_err(|source| KeyError::Read {
                        path: shown.clone(),
                        source,
                    })?
                    .permissions()
                    .mode()
                    & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::Permissions { path: shown, mode });
                }
            }
            Ok(Some(contents))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyError::Read {
            path: shown,
            source,
        }),
    }
}

/// Writes `contents` to `path` with mode 0600 (temporary file, fsync, rename); creates the
/// parent directory (0700) if needed.
pub fn write_private(path: &Path, contents: &str) -> Result<(), KeyError> {
    let write = |source| KeyError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(write)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
                    .map_err(write)?;
            }
        }
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(write)?;
    file.write_all(contents.as_bytes()).map_err(write)?;
    file.sync_all().map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The permission bits of a file.
    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn key_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode_of(&dir.path().join(NODE_KEY_FILE)), 0o600);
            std::fs::set_permissions(
                dir.path().join(NODE_KEY_FILE),
                std::fs::Permissions::from_mode(0o644),
            )
            .unwrap();
            assert!(matches!(
                load_or_create(dir.path()),
                Err(KeyError::Permissions { .. })
            ));
        }
    }

    #[test]
    fn bootstrap_secret_is_created_0600_reloaded_and_read_by_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_bootstrap_secret(dir.path()).unwrap();
        assert_eq!(load_or_create_bootstrap_secret(dir.path()).unwrap(), a);
        assert_eq!(read_bootstrap_secret(dir.path()).unwrap(), a);
        assert_eq!(
            read_bootstrap_secret(&dir.path().join(BOOTSTRAP_SECRET_FILE)).unwrap(),
            a
        );
        #[cfg(unix)]
        {
            assert_eq!(mode_of(&dir.path().join(BOOTSTRAP_SECRET_FILE)), 0o600);
        }
        std::fs::write(dir.path().join("bad"), "nope\n").unwrap();
        assert!(matches!(
            read_bootstrap_secret(&dir.path().join("bad")),
            Err(KeyError::Secret { .. })
        ));
    }

    #[test]
    fn identity_files_get_their_parent_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config/aspen/identity.key");
        let a = load_or_create_key(&path).unwrap();
        assert_eq!(load_key(&path).unwrap().public(), a.public());
        assert!(load_key(&dir.path().join("missing.key")).is_err());
    }
}
