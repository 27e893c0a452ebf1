//! Path patterns, as `--exclude` and `--append` take them: what to leave out, or
//! which files are append-only. A pattern without a `/` matches a name at any depth
//! (`*.tmp`, `node_modules`); one with a `/` matches the path below the backed-up
//! directory (`cache/**`, `var/tmp`, a leading `/` allowed), where `*` stays within
//! one component and `**` crosses them. An excluded directory is not descended into.

use std::path::Path;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

#[derive(Debug, Default)]
pub struct PathPatterns {
    names: GlobSet,
    paths: GlobSet,
    /// Paths below the backed-up directory left out whatever the patterns say.
    skipped: Vec<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("bad {flag} pattern {pattern:?}: {problem}")]
pub struct PatternError {
    flag: &'static str,
    pattern: String,
    problem: String,
}

impl PathPatterns {
    pub fn new(patterns: &[String]) -> Result<PathPatterns, PatternError> {
        PathPatterns::for_flag("--exclude", patterns)
    }

    /// The same patterns for another option (`--append`): errors name `flag`.
    pub fn for_flag(flag: &'static str, patterns: &[String]) -> Result<PathPatterns, PatternError> {
        PathPatterns::below(flag, patterns, None)
    }

    /// The patterns for a walk of `root` (the backed-up directory, canonical): an
    /// absolute path below it is taken relative to it; an absolute path elsewhere
    /// on the host can never match, and is an error, as is `..`.
    pub fn below(flag: &'static str, patterns: &[String], root: Option<&Path>) -> Result<PathPatterns, PatternError> {
        let (mut names, mut paths) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        for p in patterns {
            let bad = |problem: String| PatternError { flag, pattern: p.clone(), problem };
            let glob = |s: &str| -> Result<Glob, PatternError> {
                GlobBuilder::new(s).literal_separator(true).build().map_err(|e| bad(e.kind().to_string()))
            };
            let mut p = p.trim_end_matches('/');
            if p.split('/').any(|c| c == "..") {
                return Err(bad("paths below the backed-up directory have no `..`: it can never match".into()));
            }
            if let (Some(root), true) = (root, p.starts_with('/')) {
                let first = p.trim_start_matches('/').split('/').next().unwrap_or_default();
                match Path::new(p).strip_prefix(root) {
                    Ok(rel) if !rel.as_os_str().is_empty() => p = &p[p.len() - rel.as_os_str().len()..],
                    Ok(_) => return Err(bad("it is the backed-up directory itself".into())),
                    // `/x` is `x` at the top of the backed-up directory; unless PATH
                    // has no `x` and /x is a path of this host outside PATH: that is a
                    // host path, which can never match.
                    Err(_)
                        if root != Path::new("/")
                            && !first.is_empty()
                            && !root.join(first).exists()
                            && Path::new("/").join(first).exists() =>
                    {
                        return Err(bad(format!(
                            "it is a path on this host outside {}, so it can never match: patterns are relative to the backed-up \
                             directory (a leading / anchors them there)",
                            root.display()
                        )))
                    }
                    Err(_) => {}
                }
            }
            if p.trim_start_matches('/').is_empty() {
                return Err(bad("it matches nothing".into()));
            } else if p.contains('/') {
                paths.add(glob(p.trim_start_matches('/'))?);
            } else {
                names.add(glob(p)?);
            }
        }
        let build = |b: GlobSetBuilder| b.build().expect("each glob compiled on its own");
        Ok(PathPatterns { names: build(names), paths: build(paths), skipped: Vec::new() })
    }

    /// Leaves out `rel`, a path below the backed-up directory, exactly.
    pub fn skip(&mut self, rel: std::path::PathBuf) {
        self.skipped.push(rel);
    }

    /// Whether `rel`, a path below the backed-up directory, matches: is left out by
    /// `--exclude` patterns, or append-only by `--append` ones.
    pub fn matches(&self, rel: &Path) -> bool {
        let name_hit = rel.file_name().is_some_and(|n| self.names.is_match(Path::new(n)));
        name_hit || (!self.paths.is_empty() && self.paths.is_match(rel)) || self.skipped.iter().any(|s| s == rel)
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.paths.is_empty() && self.skipped.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[&str]) -> PathPatterns {
        PathPatterns::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn names_match_at_any_depth_and_paths_from_the_top() {
        let e = ex(&["*.tmp", "node_modules", "/cache/**", "var/tmp/"]);
        assert!(e.matches(Path::new("a.tmp")));
        assert!(e.matches(Path::new("x/y/b.tmp")));
        assert!(e.matches(Path::new("src/node_modules")));
        assert!(!e.matches(Path::new("src/node_modules_not")));
        assert!(e.matches(Path::new("cache/a/b")));
        assert!(!e.matches(Path::new("x/cache/a")));
        assert!(e.matches(Path::new("var/tmp")));
        assert!(!e.matches(Path::new("var/tmpx")));
        assert!(!e.matches(Path::new("keep.txt")));
    }

    /// Item 20 of issue 15: patterns that could never match are errors; an absolute
    /// path below the backed-up directory is taken relative to it.
    #[test]
    fn patterns_that_can_never_match_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let below = |p: &str| PathPatterns::below("--exclude", &[p.to_string()], Some(root.path()));
        for never in ["../x", "a/../b", "/etc/passwd", "/usr/**"] {
            let err = below(never).unwrap_err().to_string();
            assert!(err.contains(never) && err.contains("never match"), "{never}: {err}");
        }
        let abs = format!("{}/cache/**", root.path().display());
        let e = below(&abs).unwrap();
        assert!(e.matches(Path::new("cache/a")), "an absolute path below the root is relative to it");
        assert!(!e.matches(Path::new("other")));
        // A leading / anchors at the top, when it names nothing else on the host, or
        // something PATH has (a tree that is a root filesystem of its own).
        assert!(below("/cache-of-the-tree/**").unwrap().matches(Path::new("cache-of-the-tree/x")));
        std::fs::create_dir(root.path().join("etc")).unwrap();
        assert!(below("/etc/passwd").unwrap().matches(Path::new("etc/passwd")));
    }

    #[test]
    fn a_bad_pattern_is_an_error_naming_it() {
        let err = PathPatterns::new(&["a[".to_string()]).unwrap_err();
        assert!(err.to_string().contains("a["), "{err}");
    }
}
