//! Outputs appear whole or not at all: everything is written under a temporary name beside the
//! destination and renamed into place, so a failure midway leaves what was there before.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};

fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{tag}-{}-{nanos}", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path, "tmp");
    std::fs::write(&tmp, bytes).at(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// A directory being built under a temporary name; [`StagedDir::commit`] renames it into
/// place, dropping it uncommitted removes it.
#[derive(Debug)]
pub struct StagedDir {
    dest: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Refuses an existing `dest` unless `overwrite`.
    pub fn new(dest: &Path, overwrite: bool) -> Result<Self> {
        if dest.exists() && !overwrite {
            return Err(Error::OutputExists {
                path: dest.to_path_buf(),
            });
        }
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).at(parent)?;
        }
        let tmp = temp_sibling(dest, "partial");
        std::fs::create_dir(&tmp).at(&tmp)?;
        Ok(Self {
            dest: dest.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    /// Where to write the contents.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Moves the finished directory into place (replacing an old one last, so that at every
    /// moment one complete version exists).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.dest.exists() {
            let old = temp_sibling(&self.dest, "old");
            std::fs::rename(&self.dest, &old).at(&self.dest)?;
            std::fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
        }
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_dir_lifecycle() -> Result<()> {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        {
            let s = StagedDir::new(&dest, false)?;
            std::fs::write(s.path().join("a"), b"1").unwrap();
            // dropped without commit
        }
        assert!(!dest.exists());
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "temporary left behind"
        );
        let s = StagedDir::new(&dest, false)?;
        std::fs::write(s.path().join("a"), b"1").unwrap();
        s.commit()?;
        assert!(matches!(
            StagedDir::new(&dest, false),
            Err(Error::OutputExists { .. })
        ));
        let s = StagedDir::new(&dest, true)?;
        std::fs::write(s.path().join("b"), b"2").unwrap();
        s.commit()?;
        assert!(!dest.join("a").exists() && dest.join("b").exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        Ok(())
    }
}
