//! `--exclude` patterns. A pattern without a `/` matches a name at any depth
//! (`*.tmp`, `node_modules`); one with a `/` matches the path below the backed-up
//! directory (`cache/**`, `var/tmp`, a leading `/` allowed), where `*` stays within
//! one component and `**` crosses them. An excluded directory is not descended into.
//! `--append` patterns (append-only files) have the same form.

use std::path::Path;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

#[derive(Debug, Default)]
pub struct Excludes {
    names: GlobSet,
    paths: GlobSet,
}

#[derive(Debug, thiserror::Error)]
#[error("bad {flag} pattern {pattern:?}: {problem}")]
pub struct ExcludeError {
    flag: &'static str,
    pattern: String,
    problem: String,
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Result<Excludes, ExcludeError> {
        Excludes::for_flag("--exclude", patterns)
    }

    /// The same patterns for another option (`--append`): errors name `flag`.
    pub fn for_flag(flag: &'static str, patterns: &[String]) -> Result<Excludes, ExcludeError> {
        let (mut names, mut paths) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        for p in patterns {
            let bad = |problem: String| ExcludeError { flag, pattern: p.clone(), problem };
            let glob = |s: &str| -> Result<Glob, ExcludeError> {
                GlobBuilder::new(s).literal_separator(true).build().map_err(|e| bad(e.kind().to_string()))
            };
            let p = p.trim_end_matches('/');
            if p.trim_start_matches('/').is_empty() {
                return Err(bad("it matches nothing".into()));
            } else if p.contains('/') {
                paths.add(glob(p.trim_start_matches('/'))?);
            } else {
                names.add(glob(p)?);
            }
        }
        let build = |b: GlobSetBuilder| b.build().expect("each glob compiled on its own");
        Ok(Excludes { names: build(names), paths: build(paths) })
    }

    /// Whether `rel`, a path below the backed-up directory, is left out.
    pub fn excludes(&self, rel: &Path) -> bool {
        let name_hit = rel.file_name().is_some_and(|n| self.names.is_match(Path::new(n)));
        name_hit || (!self.paths.is_empty() && self.paths.is_match(rel))
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.paths.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn names_match_at_any_depth_and_paths_from_the_top() {
        let e = ex(&["*.tmp", "node_modules", "/cache/**", "var/tmp/"]);
        assert!(e.excludes(Path::new("a.tmp")));
        assert!(e.excludes(Path::new("x/y/b.tmp")));
        assert!(e.excludes(Path::new("src/node_modules")));
        assert!(!e.excludes(Path::new("src/node_modules_not")));
        assert!(e.excludes(Path::new("cache/a/b")));
        assert!(!e.excludes(Path::new("x/cache/a")));
        assert!(e.excludes(Path::new("var/tmp")));
        assert!(!e.excludes(Path::new("var/tmpx")));
        assert!(!e.excludes(Path::new("keep.txt")));
    }

    #[test]
    fn a_bad_pattern_is_an_error_naming_it() {
        let err = Excludes::new(&["a[".to_string()]).unwrap_err();
        assert!(err.to_string().contains("a["), "{err}");
    }
}
