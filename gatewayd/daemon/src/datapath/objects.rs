//! The compiled programs of `xdp/`, embedded by build.rs, and the names of their programs.

include!(concat!(env!("OUT_DIR"), "/bpf_objects.rs"));

/// The XDP load balancer's program name in `xdp/lb.c`.
pub const LB_PROGRAM: &str = "gatewayd_lb";
/// Egress SNAT at tcx egress of the egress interface (`xdp/egress.c`).
pub const SNAT_PROGRAM: &str = "gatewayd_snat";
/// Reverse NAT of egress replies at tcx ingress of the same interface.
pub const RNAT_PROGRAM: &str = "gatewayd_rnat";
/// The backend-side decapsulation program in `xdp/decap.c`.
pub const DECAP_PROGRAM: &str = "gatewayd_decap";

/// A stable hash of an embedded object: names the program pin, so a restart of the same build
/// adopts the running program while a different build replaces it.
pub fn object_hash(object: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x6761_7465_7761_7964, 0);
    h.write(object);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatewayd_common::map_names;
    use std::collections::BTreeSet;

    /// The Rust mirrors must match the contract the compiler laid out (gatewayd_maps.h), read
    /// from the BTF of the embedded objects with bpftool: every mirrored struct's size and field
    /// offsets, every enum's enumerators (names, values, order: a reordered `gd_reason` would
    /// relabel the metrics), and nothing in the contract without a mirror.
    #[test]
    fn rust_map_types_match_the_btf_of_the_objects() {
        let dir = std::env::temp_dir().join(format!("gatewayd-btf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut types = Vec::new();
        for (name, object) in [("lb.o", LB), ("decap.o", DECAP), ("egress.o", EGRESS)] {
            let path = dir.join(name);
            std::fs::write(&path, object).unwrap();
            let out = std::process::Command::new("bpftool")
                .args(["-j", "btf", "dump", "file"])
                .arg(&path)
                .output()
                .expect("bpftool is needed for this test (apt-get install bpftool)");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            types.extend(json["types"].as_array().unwrap().iter().cloned());
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let named = |kind: &str, name: &str| {
            types
                .iter()
                .find(|t| t["kind"] == kind && t["name"] == name)
                .unwrap_or_else(|| panic!("{kind} {name} not in the objects' BTF"))
        };
        let layouts = gatewayd_common::maps::layouts();
        let enums = gatewayd_common::maps::enums();

        for layout in &layouts {
            let ty = named("STRUCT", layout.c_name);
            assert_eq!(
                ty["size"].as_u64().unwrap() as usize,
                layout.size,
                "size of {}",
                layout.c_name
            );
            let members = ty["members"].as_array().unwrap();
            assert_eq!(
                members.len(),
                layout.fields.len(),
                "field count of {}",
                layout.c_name
            );
            for (field, offset) in &layout.fields {
                let m = members
                    .iter()
                    .find(|m| m["name"] == *field)
                    .unwrap_or_else(|| panic!("{}.{field} not in C", layout.c_name));
                assert_eq!(
                    m["bits_offset"].as_u64().unwrap() as usize,
                    offset * 8,
                    "{}.{field}",
                    layout.c_name
                );
            }
        }

        for contract in &enums {
            let ty = named("ENUM", contract.c_name);
            let in_c: Vec<(String, u64)> = ty["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    (
                        v["name"].as_str().unwrap().to_string(),
                        v["val"].as_u64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(in_c, contract.enumerators, "enum {}", contract.c_name);
        }

        // The other way round: every gd_ struct and enum of the objects has a mirror (or is
        // the datapath's own), so a new one cannot be left out of the checks above.
        for t in &types {
            let name = t["name"].as_str().unwrap_or_default();
            if !name.starts_with("gd_") {
                continue;
            }
            match t["kind"].as_str().unwrap() {
                "STRUCT" => assert!(
                    layouts.iter().any(|l| l.c_name == name)
                        || gatewayd_common::maps::DATAPATH_ONLY_STRUCTS.contains(&name),
                    "struct {name} is in the objects but has no mirror in gatewayd_common::maps"
                ),
                "ENUM" => assert!(
                    enums.iter().any(|e| e.c_name == name),
                    "enum {name} is in the objects but has no mirror in gatewayd_common::maps"
                ),
                _ => {}
            }
        }
    }

    #[test]
    fn object_hash_is_stable_and_distinguishes_builds() {
        assert_eq!(object_hash(b"abc"), object_hash(b"abc"));
        assert_ne!(object_hash(LB), object_hash(DECAP));
    }

    /// The loader finds programs by these names: a program renamed in C must be renamed here.
    #[test]
    fn program_names_are_programs_of_their_objects() {
        for (object, names) in [
            (LB, &[LB_PROGRAM][..]),
            (EGRESS, &[SNAT_PROGRAM, RNAT_PROGRAM]),
            (DECAP, &[DECAP_PROGRAM]),
        ] {
            let obj = aya_obj::Object::parse(object).unwrap();
            for name in names {
                assert!(obj.programs.contains_key(*name), "{name}");
            }
        }
    }

    /// A map renamed, added or dropped in C must be renamed, added or dropped in
    /// `map_names` too: the daemon opens and sizes maps by those names.
    #[test]
    fn map_names_are_exactly_the_maps_of_the_objects() {
        let mut in_objects = BTreeSet::new();
        for object in [LB, EGRESS, DECAP] {
            let obj = aya_obj::Object::parse(object).unwrap();
            // Global variables live in section maps (`.rodata`, `.bss`): not maps of ours.
            in_objects.extend(obj.maps.keys().filter(|n| !n.starts_with('.')).cloned());
        }
        let named: BTreeSet<String> = map_names::ALL.iter().map(|n| n.to_string()).collect();
        assert_eq!(named.len(), map_names::ALL.len(), "a name listed twice");
        assert_eq!(named, in_objects);
    }
}
