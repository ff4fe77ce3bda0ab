//! Helpers for plugin settings: the host renders TOML values as text, arrays
//! as comma-separated items (string items may keep their quotes).

/// Comma-separated items, trimmed and unquoted, empty ones dropped.
pub fn items(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(|item| item.trim().trim_matches(|c| c == '"' || c == '\'').trim())
        .filter(|item| !item.is_empty())
}

/// Rejects unknown and repeated keys, naming the plugin and the known keys.
pub fn check_keys(
    plugin: &str,
    settings: &[(String, String)],
    known: &[&str],
) -> Result<(), String> {
    for (i, (key, _)) in settings.iter().enumerate() {
        if !known.contains(&key.as_str()) {
            let list = if known.is_empty() {
                "it takes no settings".to_owned()
            } else {
                format!(
                    "known: {}",
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(format!("{plugin}: unknown setting `{key}` ({list})"));
        }
        if settings[..i].iter().any(|(k, _)| k == key) {
            return Err(format!("{plugin}: setting `{key}` is given more than once"));
        }
    }
    Ok(())
}

/// Absolute paths without wildcards (swap files).
pub fn paths(plugin: &str, key: &str, value: &str) -> Result<Vec<String>, String> {
    items(value)
        .map(|p| {
            if !p.starts_with('/') || p.contains(['*', '?']) || p.split('/').any(|c| c == "..") {
                Err(format!(
                    "{plugin}: setting `{key}`: `{p}` is not an absolute path without wildcards"
                ))
            } else {
                Ok(p.to_owned())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_and_paths() {
        assert!(check_keys("p", &set(&[("a", "1")]), &["a"]).is_ok());
        let e = check_keys("p", &set(&[("b", "1")]), &["a"]).unwrap_err();
        assert!(e.contains("`b`") && e.contains("`a`"), "{e}");
        assert!(check_keys("p", &set(&[("a", "1"), ("a", "2")]), &["a"]).is_err());
        assert!(
            check_keys("p", &set(&[("a", "1")]), &[])
                .unwrap_err()
                .contains("no settings")
        );
        assert_eq!(
            paths("p", "k", "\"/swapfile\", /swap.img").unwrap(),
            vec!["/swapfile", "/swap.img"]
        );
        assert!(paths("p", "k", "swapfile").is_err());
        assert!(paths("p", "k", "/a/*").is_err());
    }
}
