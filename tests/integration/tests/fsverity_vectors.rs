//! libpowernode::fsverity against the real `fsverity digest` (fsverity-utils) on files of
//! several sizes around the block and tree-level boundaries.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use powernode_integration_tests::{describe, require_tool, run};

#[test]
fn userspace_digest_matches_fsverity_digest() -> Result<()> {
    require_tool("fsverity")?;
    let dir = tempfile::tempdir()?;
    // 4096 * 128 = one full level-1 block of hashes; +1 needs a second level.
    for size in [0usize, 1, 4095, 4096, 4097, 524_288, 524_289, 1_048_577] {
        let data: Vec<u8> = (0..size)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let path = dir.path().join(format!("f{size}"));
        std::fs::write(&path, &data)?;
        let out = run(Command::new("fsverity").arg("digest").arg(&path))?;
        ensure!(out.status.success(), "fsverity digest: {}", describe(&out));
        let want = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .context("no output")?
            .to_string();
        let got = powernode::fsverity::format(&powernode::fsverity::digest_file(&path)?);
        ensure!(got == want, "size {size}: ours {got}, fsverity {want}");
    }
    Ok(())
}
