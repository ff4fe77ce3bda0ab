//! Path patterns for excluded guest files: absolute paths whose components
//! may use `*` (any run of characters within a component), `?` (one
//! character) and `**` as a whole component (any number of components,
//! none included). A pattern that matches a directory covers everything
//! below it, so `/tmp` and `/tmp/**` say the same.

const MAX_COMPONENTS: usize = 64;
const MAX_DOUBLE_STARS: usize = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    parts: Vec<String>,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "`{text}` is not an absolute path (start it with /)"
            ));
        };
        let parts: Vec<String> = rest
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if parts.iter().any(|p| p == "." || p == "..") {
            return Err(format!("`{text}` contains . or .. components"));
        }
        if parts.iter().any(|p| p.contains("**") && p != "**") {
            return Err(format!("`{text}`: ** must be a whole path component"));
        }
        if parts.len() > MAX_COMPONENTS {
            return Err(format!(
                "`{text}` has more than {MAX_COMPONENTS} components"
            ));
        }
        if parts.iter().filter(|p| *p == "**").count() > MAX_DOUBLE_STARS {
            return Err(format!("`{text}` has more than {MAX_DOUBLE_STARS} `**`"));
        }
        if parts.is_empty() || parts.iter().all(|p| p == "**") {
            return Err(format!("`{text}` would exclude every file"));
        }
        Ok(Pattern {
            text: text.to_owned(),
            parts,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether `path` (components from the root) matches.
    pub fn matches(&self, path: &[String], fold: bool) -> bool {
        matches(&self.parts, path, fold)
    }

    /// Whether something strictly below the directory `path` could match.
    pub fn may_match_below(&self, path: &[String], fold: bool) -> bool {
        may_match_below(&self.parts, path, fold)
    }
}

fn matches(pat: &[String], path: &[String], fold: bool) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            matches(rest, path, fold) || (!path.is_empty() && matches(pat, &path[1..], fold))
        }
        Some((first, rest)) => match path.split_first() {
            Some((name, below)) => component(first, name, fold) && matches(rest, below, fold),
            None => false,
        },
    }
}

fn may_match_below(pat: &[String], path: &[String], fold: bool) -> bool {
    match (pat.split_first(), path.split_first()) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some((first, _)), Some(_)) if first == "**" => true,
        (Some((first, rest)), Some((name, below))) => {
            component(first, name, fold) && may_match_below(rest, below, fold)
        }
    }
}

/// `*` and `?` within one component; linear-time backtracking on the last `*`.
fn component(pattern: &str, name: &str, fold: bool) -> bool {
    let norm = |s: &str| -> Vec<char> {
        if fold {
            s.chars().flat_map(char::to_lowercase).collect()
        } else {
            s.chars().collect()
        }
    };
    let (p, n) = (norm(pattern), norm(name));
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> Vec<String> {
        s.split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn matches_components_stars_and_double_stars() {
        let p = Pattern::parse("/var/cache/**").unwrap();
        assert!(p.matches(&path("/var/cache/apt/x.bin"), false));
        assert!(p.matches(&path("/var/cache"), false));
        assert!(!p.matches(&path("/var/log/x"), false));
        assert!(p.may_match_below(&path("/var"), false));
        assert!(!p.may_match_below(&path("/usr"), false));
        let q = Pattern::parse("/home/*/.cache/*.tmp").unwrap();
        assert!(q.matches(&path("/home/ann/.cache/a.tmp"), false));
        assert!(!q.matches(&path("/home/ann/.cache/a.tmpx"), false));
        assert!(!q.matches(&path("/home/ann/.cache/A.TMP"), false));
        assert!(q.matches(&path("/home/ann/.cache/A.TMP"), true));
        let r = Pattern::parse("/**/*.log").unwrap();
        assert!(r.matches(&path("/a.log"), false));
        assert!(r.matches(&path("/x/y/z.log"), false));
        assert!(r.may_match_below(&path("/anything"), false));
        assert!(component("a*b*c", "aXXbYYc", false));
        assert!(!component("a*b*c", "aXXbYY", false));
        assert!(component("?x*", "yx", false));
    }

    #[test]
    fn rejects_relative_and_all_covering_patterns() {
        for bad in ["tmp/**", "/", "/**", "/a/../b", "/a**"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
