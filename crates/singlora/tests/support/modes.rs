//! File modes of outputs: what a plain create gives under this process's umask, and checks
//! that everything an output holds has it (shared by the library's and the CLI's tests).

use std::path::{Path, PathBuf};

use std::os::unix::fs::PermissionsExt;

/// The permission bits of `p` (links not followed).
pub fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// The modes a file and a directory created in `dir` get from the process's umask, found by
/// making one of each the ordinary way; under the usual umask 022 they must be 0644 and 0755.
pub fn expected_modes(dir: &Path) -> (u32, u32) {
    let f = dir.join("probe-file");
    std::fs::write(&f, b"").unwrap();
    let d = dir.join("probe-dir");
    std::fs::create_dir(&d).unwrap();
    let modes = (mode(&f), mode(&d));
    std::fs::remove_file(&f).unwrap();
    std::fs::remove_dir(&d).unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if status
        .lines()
        .any(|l| l.split_whitespace().eq(["Umask:", "0022"]))
    {
        assert_eq!(modes, (0o644, 0o755));
    }
    modes
}

/// Every file and directory under `dir` (itself included) has the modes of `expected_modes`;
/// returns what was checked.
pub fn assert_default_modes(dir: &Path, (file, folder): (u32, u32)) -> Vec<PathBuf> {
    let all = walk(dir);
    for e in &all {
        let want = if e.is_dir() { folder } else { file };
        assert_eq!(
            mode(e),
            want,
            "{} is {:o}, expected {want:o}",
            e.display(),
            mode(e)
        );
    }
    assert!(all.len() > 1, "nothing under {}", dir.display());
    all
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
