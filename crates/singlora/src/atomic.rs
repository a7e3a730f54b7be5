//! Outputs appear whole or not at all, and never at a user's expense.
//!
//! - Everything is written under a temporary name beside the destination and renamed into
//!   place, so a failure midway leaves what was there before; an old output is moved aside
//!   before the new one takes its name and deleted only then.
//! - An output may never be, contain or sit inside an input ([`check_disjoint`], on paths with
//!   links resolved).
//! - `--overwrite` replaces only what singlora wrote ([`is_ours`]: the [`MARKER`] file of a
//!   merged model or an exported adapter, the `run.json` of a run directory).
//! - Temporary names say whose they are (`.NAME.partial-PID-NANOS`, `.NAME.old-…`,
//!   `.NAME.tmp-…`), so a later start removes those an interrupted process left
//!   ([`clean_stale`]), and only those.

use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};

/// The file singlora writes into every output directory it makes whole (a merged model, an
/// exported adapter), so that `--overwrite` can tell its own outputs from anything else.
pub const MARKER: &str = ".singlora-output";

/// The kinds of temporary names [`temp_sibling`] makes.
const TEMP_TAGS: [&str; 3] = ["partial", "old", "tmp"];

pub(crate) fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
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

/// The process id in a name [`temp_sibling`] made, or None for any other name.
fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    TEMP_TAGS.iter().find_map(|tag| {
        let (_, tail) = rest.rsplit_once(&format!(".{tag}-"))?;
        let (pid, nanos) = tail.split_once('-')?;
        nanos.parse::<u32>().ok()?;
        pid.parse().ok()
    })
}

/// Whether process `pid` is running (on systems without /proc, assumed so: nothing is then
/// cleaned).
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// Removes the temporary files and directories in `dir` that a singlora process which is no
/// longer running left behind (an interrupted merge, checkpoint or output write), and returns
/// them. Names of any other form, and those of running processes, are left alone.
pub fn clean_stale(dir: &Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(vec![]);
    };
    let mut removed = vec![];
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_owner(&name) else {
            continue;
        };
        if alive(pid) || !owned_by_us(&e.path()) {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.at(&p)?;
        removed.push(p);
    }
    removed.sort();
    Ok(removed)
}

/// Whether `path` belongs to this process's user (Unix; elsewhere, true).
fn owned_by_us(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return false;
        };
        let Ok(me) = std::fs::metadata("/proc/self") else {
            return true;
        };
        meta.uid() == me.uid()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        true
    }
}

/// `p` made absolute with links resolved: canonical where it exists, else its nearest existing
/// ancestor's canonical form with the rest appended (`.` and `..` folded).
pub fn resolve(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().at(Path::new("."))?.join(p)
    };
    let mut existing = abs.as_path();
    let mut rest = vec![];
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for comp in rest.iter().rev() {
                match comp {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    c => out.push(c.as_os_str()),
                }
            }
            return Ok(out);
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// Refuses an output `out` that is, contains or sits inside one of `inputs` (each named by
/// its role in the message, e.g. `("--base", path)`).
pub fn check_disjoint(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = resolve(out)?;
    for (role, input) in inputs {
        let i = resolve(input)?;
        let how = if o == i {
            "is"
        } else if i.starts_with(&o) {
            "contains"
        } else if o.starts_with(&i) {
            "is inside"
        } else {
            continue;
        };
        return Err(Error::msg(format!(
            "the output {} {how} the input {role} {}: choose an output outside every input",
            out.display(),
            input.display()
        )));
    }
    Ok(())
}

/// Whether `dir` is an output singlora wrote: a merged model or exported adapter (its
/// [`MARKER`]) or a run directory (its `run.json`).
pub fn is_ours(dir: &Path) -> bool {
    dir.is_dir() && (dir.join(MARKER).is_file() || dir.join("run.json").is_file())
}

/// Refuses to replace an existing `out` unless `overwrite` is given and singlora wrote it.
pub fn check_replaceable(out: &Path, overwrite: bool) -> Result<()> {
    if !out.exists() && !out.is_symlink() {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::OutputExists {
            path: out.to_path_buf(),
        });
    }
    if !is_ours(out) {
        return Err(Error::msg(format!(
            "{} exists and was not written by singlora (no {MARKER} or run.json in it): --overwrite replaces only singlora's own outputs; choose another output or remove it yourself",
            out.display()
        )));
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// Writes what `fill` writes to `path` through a temporary file and a rename. The file is
/// created as `File::create` creates files (mode 0666 less the umask, usually 0644), so other
/// users and servers can read a model exactly as they can read its config.json.
pub fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_sibling(path, "tmp");
    try_write_to(path, &tmp, |w| fill(w).map_err(|e| Error::io(&tmp, e)))
}

/// [`write_with`] for a `fill` that can fail in other ways than I/O (it names the file in its
/// own errors); nothing appears at `path` unless `fill` succeeds.
pub fn try_write_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    try_write_to(path, &temp_sibling(path, "tmp"), fill)
}

fn try_write_to(
    path: &Path,
    tmp: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let written = std::fs::File::create(tmp)
        .map_err(|e| Error::io(tmp, e))
        .and_then(|f| {
            let mut w = BufWriter::with_capacity(1 << 20, f);
            fill(&mut w)?;
            w.flush().map_err(|e| Error::io(tmp, e))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(tmp);
        return Err(e);
    }
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
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

    /// A whole output for the user: refused when it overlaps an input or would replace
    /// something singlora did not write; what interrupted writes left beside it is removed
    /// first (returned). The committed directory carries [`MARKER`].
    pub fn output(
        dest: &Path,
        overwrite: bool,
        inputs: &[(&str, &Path)],
    ) -> Result<(Self, Vec<PathBuf>)> {
        check_disjoint(dest, inputs)?;
        check_replaceable(dest, overwrite)?;
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let cleaned = clean_stale(parent)?;
        let staged = Self::new(dest, true)?;
        let marker = staged.path().join(MARKER);
        std::fs::write(&marker, "written by singlora\n").at(&marker)?;
        Ok((staged, cleaned))
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
