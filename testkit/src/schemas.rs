//! The published JSON Schemas (`docs/schema/`, generated from the contract types listed in
//! `crm_node::contracts`) as tests use them: read one and validate a real reply, event or
//! docs example against it, so a schema that does not describe what the engine sends fails
//! a test. Tests only; panics with a message naming the file and what did not match.

use crate::paths::repo_file;
use serde_json::Value;

/// The schema published as `docs/schema/<file>`.
pub fn published_schema(file: &str) -> Value {
    let path = repo_file(&format!("docs/schema/{file}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; generate it with CRM_WRITE_SCHEMAS=1 cargo test -p crm-tests --test contract_schemas",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Where `instance` breaks the schema published as `file` (empty: it conforms).
pub fn schema_violations(file: &str, instance: &Value) -> Vec<String> {
    let schema = published_schema(file);
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("docs/schema/{file} is not a valid JSON Schema: {e}"));
    validator
        .iter_errors(instance)
        .map(|error| format!("at {}: {error}", error.instance_path()))
        .collect()
}

/// Panics unless `instance` (described by `what`) conforms to the schema published as `file`.
pub fn assert_matches_schema(file: &str, instance: &Value, what: &str) {
    let violations = schema_violations(file, instance);
    assert!(
        violations.is_empty(),
        "{what} does not match docs/schema/{file}:\n{}\n{what}: {instance}",
        violations.join("\n")
    );
}
