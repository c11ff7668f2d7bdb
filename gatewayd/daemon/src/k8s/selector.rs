//! Kubernetes label selectors (`matchLabels` and `matchExpressions`), as the API defines them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::BTreeMap;

/// Whether `labels` satisfy `selector`; `Err` names an invalid expression. An empty selector
/// matches everything.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    for (key, value) in selector.match_labels.iter().flatten() {
        if labels.get(key) != Some(value) {
            return Ok(false);
        }
    }
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        let present = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!("{} {} needs values", e.key, e.operator))
            }
            "In" => present.is_some_and(|v| values.contains(v)),
            "NotIn" => present.is_none_or(|v| !values.contains(v)),
            "Exists" => present.is_some(),
            "DoesNotExist" => present.is_none(),
            other => return Err(format!("unknown operator {other:?} for {}", e.key)),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks every expression of `selector` once, whatever labels it will meet.
pub fn validate(selector: &LabelSelector) -> Result<(), String> {
    for e in selector.match_expressions.iter().flatten() {
        // Labels holding every key: each operator either decides or fails on its own shape.
        let labels = BTreeMap::from([(e.key.clone(), String::new())]);
        let single = LabelSelector {
            match_expressions: Some(vec![e.clone()]),
            match_labels: None,
        };
        matches(&single, &labels)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::labels;
    use serde_json::json;

    fn selector(v: serde_json::Value) -> LabelSelector {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn match_labels_and_expressions_combine() {
        let s = selector(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "env", "operator": "NotIn", "values": ["dev"]},
                {"key": "team", "operator": "Exists"}
            ]
        }));
        let good = labels(&[("app", "web"), ("tier", "b"), ("team", "x")]);
        assert_eq!(matches(&s, &good), Ok(true));
        for bad in [
            labels(&[("app", "db"), ("tier", "b"), ("team", "x")]),
            labels(&[("app", "web"), ("tier", "c"), ("team", "x")]),
            labels(&[("app", "web"), ("tier", "a"), ("team", "x"), ("canary", "1")]),
            labels(&[("app", "web"), ("tier", "a"), ("team", "x"), ("env", "dev")]),
            labels(&[("app", "web"), ("tier", "a")]),
        ] {
            assert_eq!(matches(&s, &bad), Ok(false), "{bad:?}");
        }
        assert_eq!(matches(&LabelSelector::default(), &labels(&[])), Ok(true));
    }

    #[test]
    fn invalid_expressions_are_errors() {
        for s in [
            json!({"matchExpressions": [{"key": "a", "operator": "Near", "values": ["x"]}]}),
            json!({"matchExpressions": [{"key": "a", "operator": "In"}]}),
        ] {
            assert!(validate(&selector(s.clone())).is_err(), "{s}");
        }
        let ok = json!({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["x"]}]});
        assert_eq!(validate(&selector(ok)), Ok(()));
    }
}
