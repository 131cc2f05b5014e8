//! The TCG VM tier's shared pieces: where `make vm-assets` put Debian's kernel.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::workspace_root;

/// (the unpacked kernel package root, its vmlinuz) under build/vm/kernel.
pub fn kernel() -> Result<(PathBuf, PathBuf)> {
    let dir = workspace_root().join("build/vm/kernel");
    let boot = dir.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("{} missing: run `make vm-assets`", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz-* in build/vm/kernel/boot: run `make vm-assets`")?;
    Ok((dir, vmlinuz))
}
