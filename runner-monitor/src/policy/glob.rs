//! The policy's two kinds of glob, shared by the sections that compile them.

use globset::{Glob, GlobBuilder, GlobMatcher};

/// A glob over paths: `*` does not cross a `/`.
pub(super) fn path_glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern).literal_separator(true).build()
}

/// A glob over repository or workflow names.
pub(super) fn name_glob(pattern: &str) -> Result<GlobMatcher, globset::Error> {
    Ok(GlobBuilder::new(pattern).build()?.compile_matcher())
}
