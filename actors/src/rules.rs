//! The rules file (placeholder; the domain helper fills it in).

#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub version: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RulesError(pub String);

impl Rules {
    pub fn from_toml_str(_text: &str) -> Result<Rules, RulesError> {
        Ok(Rules { version: 1 })
    }
    pub fn load(path: &std::path::Path) -> Result<Rules, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|e| RulesError(format!("{}: {e}", path.display())))?;
        Rules::from_toml_str(&text)
    }
    pub fn currencies(&self) -> Vec<String> {
        vec!["EUR".to_string()]
    }
}
