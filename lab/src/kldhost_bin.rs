//! Running the shipped `.ko` through `kldhost`, the program that loads it into an emulated
//! FreeBSD kernel (the `kldhost` crate).
//!
//! The lab cannot link kldhost (kldhost depends on this crate), so it runs the `kldhost`
//! binary built next to the running `nvmehp-lab`: `cargo build --release --workspace` puts both
//! in `target/release`. The module is `nvme_hotplug.ko` at the repository root (what `make`
//! builds there), found by walking up from the current directory.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kldhost binary's file name.
pub const KLDHOST_BIN: &str = "kldhost";
/// The module's file name at the repository root.
pub const KO_NAME: &str = "nvme_hotplug.ko";

/// What is missing, and how to build it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// No kldhost next to the running program (the path looked at).
    Kldhost(PathBuf),
    /// No repository above the current directory to find the module in.
    Repository(PathBuf),
    /// The module is not there (the path looked at).
    Module(PathBuf),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HOW: &str = "build both: `make` at the repository root for nvme_hotplug.ko, `cargo build --release -p kldhost` for kldhost";
        match self {
            Missing::Kldhost(p) => write!(f, "{} not found (kldhost is looked for next to this program); {HOW}", p.display()),
            Missing::Repository(p) => write!(f, "no nvme_hotplug repository (kmod/ and Cargo.toml) at or above {}; pass --ko PATH, or {HOW}", p.display()),
            Missing::Module(p) => write!(f, "{} not found; {HOW}", p.display()),
        }
    }
}

impl std::error::Error for Missing {}

/// The `kldhost` binary in the directory of the running executable.
pub fn kldhost_next_to_me() -> Result<PathBuf, Missing> {
    let me = std::env::current_exe().unwrap_or_default();
    let bin = me.parent().unwrap_or(Path::new(".")).join(KLDHOST_BIN);
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(Missing::Kldhost(bin))
    }
}

/// The repository root at or above `dir`: the first directory holding both `kmod/` and
/// `Cargo.toml`.
pub fn repository_root(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().find(|d| d.join("kmod").is_dir() && d.join("Cargo.toml").is_file()).map(Path::to_path_buf)
}

/// `ko` if given (it must exist), else `nvme_hotplug.ko` at the repository root found from the
/// current directory.
pub fn module(ko: Option<&Path>) -> Result<PathBuf, Missing> {
    let path = match ko {
        Some(p) => p.to_path_buf(),
        None => {
            let cwd = std::env::current_dir().unwrap_or_default();
            repository_root(&cwd).ok_or(Missing::Repository(cwd))?.join(KO_NAME)
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Missing::Module(path))
    }
}

/// `kldhost <args...>`, with the kldhost found next to the running program.
pub fn command<I, S>(args: I) -> Result<Command, Missing>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(kldhost_next_to_me()?);
    c.args(args);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_root_is_found_from_a_subdirectory_and_not_from_outside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("repo");
        std::fs::create_dir_all(root.join("kmod")).expect("kmod");
        std::fs::create_dir_all(root.join("lab/src")).expect("lab/src");
        std::fs::write(root.join("Cargo.toml"), "").expect("Cargo.toml");
        assert_eq!(repository_root(&root.join("lab/src")), Some(root.clone()));
        assert_eq!(repository_root(&root), Some(root.clone()));
        // kmod/ alone (no Cargo.toml next to it) is not a repository.
        std::fs::create_dir_all(dir.path().join("other/kmod")).expect("other");
        assert_eq!(repository_root(&dir.path().join("other")), None);
        // A named module must exist; the error says how to build it.
        let e = module(Some(&root.join(KO_NAME))).expect_err("no .ko yet");
        assert!(e.to_string().contains("`make`") && e.to_string().contains("cargo build --release -p kldhost"), "{e}");
        std::fs::write(root.join(KO_NAME), b"").expect("ko");
        assert_eq!(module(Some(&root.join(KO_NAME))), Ok(root.join(KO_NAME)));
    }
}
