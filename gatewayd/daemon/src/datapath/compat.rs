//! Pinned maps a new build cannot use: a map whose layout changed is recreated, not adopted.

use anyhow::{Context, Result};
use std::path::Path;
use tracing::warn;

/// Drops pinned maps whose type, key, value, size or flags no longer match what this build
/// expects: reusing them would feed the new program garbage. The map is recreated on load; its
/// state is lost, and the log says so.
pub(super) fn drop_incompatible_maps(dir: &Path, object: &[u8], overrides: &[(&str, u32)]) -> Result<()> {
    let obj = aya_obj::Object::parse(object).context("parsing the embedded object")?;
    for (name, def) in &obj.maps {
        let pin = dir.join(name);
        if !pin.exists() {
            continue;
        }
        let max_entries = overrides
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(def.max_entries());
        let live = aya::maps::MapInfo::from_pin(&pin)
            .with_context(|| format!("reading pinned map {}", pin.display()))?;
        let live_type = live.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let mut changes = Vec::new();
        let mut check = |what: &str, old: u32, new: u32| {
            if old != new {
                changes.push(format!("{what} {old} -> {new}"));
            }
        };
        check("type", live_type, def.map_type());
        check("key size", live.key_size(), def.key_size());
        check("value size", live.value_size(), def.value_size());
        // Per-CPU and ring-buffer sizes are rounded by the kernel; arrays and hashes are exact.
        check("max entries", live.max_entries(), max_entries);
        check("flags", live.map_flags(), def.map_flags());
        const BPF_MAP_TYPE_HASH_OF_MAPS: u32 = 13;
        if let Some(template) = def.inner().filter(|_| live_type == BPF_MAP_TYPE_HASH_OF_MAPS) {
            if let Some(held) = inner_map_flags(&pin)? {
                check("inner map flags", held, template.map_flags());
            }
        }
        if !changes.is_empty() {
            warn!(
                map = name.as_str(),
                changes = changes.join(", "),
                "pinned map layout differs from this build: recreating it (its entries are dropped)"
            );
            std::fs::remove_file(&pin)?;
        }
    }
    Ok(())
}

/// The flags of an inner map that the pinned map-in-map at `pin` holds, `None` when it holds
/// none. The kernel does not report a map-in-map's inner template, and refuses inner maps
/// whose flags differ from it, so a held map stands for the template. (An empty outer map of
/// an older layout is kept, and its first insert fails with an error naming it.)
fn inner_map_flags(pin: &Path) -> Result<Option<u32>> {
    let outer: aya::maps::HashOfMaps<aya::maps::MapData, u32, aya::maps::MapData> =
        aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(pin)?)?.try_into()?;
    let Some(key) = outer.keys().next() else {
        return Ok(None);
    };
    let inner = outer.get(&key?, 0)?;
    Ok(Some(inner.info()?.map_flags()))
}
