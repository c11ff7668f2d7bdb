//! Small JSON files under `daemon.state_dir` that carry what the kernel cannot hold for us
//! across a restart (names of map ids, addresses gatewayd assigned).

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// The value stored at `path`, or the default when the file does not exist yet (first start).
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replaces the file at `path` with `value`, creating its directory. Written to a temporary
/// file and renamed, so a crash mid-write leaves the previous content, never a truncated one.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_missing_file_is_the_default_and_a_saved_value_comes_back() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gatewayd-state-{}", std::process::id()));
        let path = dir.join("sub/ids.json");
        let empty: BTreeMap<String, u32> = load(&path)?;
        assert!(empty.is_empty());
        let value = BTreeMap::from([("a".to_string(), 7u32)]);
        save(&path, &value)?;
        assert_eq!(load::<BTreeMap<String, u32>>(&path)?, value);
        std::fs::write(&path, b"{not json")?;
        let err = load::<BTreeMap<String, u32>>(&path).unwrap_err();
        assert!(format!("{err:#}").contains("ids.json"), "{err:#}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
