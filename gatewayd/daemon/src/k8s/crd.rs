//! The `EgressGatewayPolicy` custom resource (config/crds/egressgatewaypolicy.yaml).
//!
//! gatewayd watches these as untyped objects and parses each spec itself: one malformed
//! object must be reported and skipped, not break the list of all the others (a typed watch
//! fails the whole list on the first object that does not deserialize).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::ApiResource;
use serde::Deserialize;

pub const GROUP: &str = "gatewayd.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "EgressGatewayPolicy";
pub const PLURAL: &str = "egressgatewaypolicies";

pub fn api_resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressGatewayPolicySpec {
    /// Source pods: a pod matches when any entry matches it.
    #[serde(default)]
    pub selectors: Vec<PodSelector>,
    /// Source CIDRs besides the selected pods.
    #[serde(default, rename = "sourceCIDRs")]
    pub source_cidrs: Vec<String>,
    #[serde(default, rename = "destinationCIDRs")]
    pub destination_cidrs: Vec<String>,
    #[serde(default, rename = "excludedCIDRs")]
    pub excluded_cidrs: Vec<String>,
    /// The SNAT address; absent: the interface's first address.
    #[serde(rename = "egressIP")]
    pub egress_ip: Option<String>,
    /// The gateway interface traffic leaves by; absent: `[egress] interface` of the TOML.
    pub interface: Option<String>,
}

/// Both selectors must match; an absent one matches everything.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSelector {
    pub pod_selector: Option<LabelSelector>,
    pub namespace_selector: Option<LabelSelector>,
}
