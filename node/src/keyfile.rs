//! The node key on disk: `DATA_DIR/node.key`, mode 0600, created on first start.

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
}

/// Loads the node key from `dir`, creating it (0600, fsynced) if it does not exist.
pub fn load_or_create(dir: &Path) -> Result<NodeKey, KeyError> {
    let path = dir.join(NODE_KEY_FILE);
    let shown = path.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(contents) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path)
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
            NodeKey::from_file_contents(&contents).map_err(|source| KeyError::Format {
                path: shown,
                source,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodeKey::generate();
            let write = |source| KeyError::Write {
                path: shown.clone(),
                source,
            };
            let tmp = dir.join(format!("{NODE_KEY_FILE}.tmp"));
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(&tmp).map_err(write)?;
            file.write_all(key.to_file_contents().as_bytes())
                .map_err(write)?;
            file.sync_all().map_err(write)?;
            std::fs::rename(&tmp, &path).map_err(write)?;
            Ok(key)
        }
        Err(source) => Err(KeyError::Read {
            path: shown,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(NODE_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
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
}
