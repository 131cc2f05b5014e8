//! Userspace fs-verity file digest (the value `fsverity digest` prints and the kernel's
//! `FS_IOC_MEASURE_VERITY` returns): SHA-256, 4096-byte blocks, no salt.
//!
//! The Merkle tree hashes every 4096-byte data block (the last one zero-padded); the hashes are
//! concatenated and split into 4096-byte blocks (zero-padded) which are hashed again, level by
//! level, until a single hash remains: the root hash (for a one-block file, the hash of that
//! block; all zeros for an empty file). The
//! file digest is the SHA-256 of the 256-byte `fsverity_descriptor` (version 1, algorithm 1 =
//! SHA-256, log2 block size 12, data size, root hash). The data is streamed; only the level-0
//! hashes (32 bytes per 4 KiB) are kept in memory.

use std::io::Read;
use std::path::Path;

use aws_lc_rs::digest::{Context, SHA256, digest};

/// Merkle tree block size.
pub const BLOCK_SIZE: usize = 4096;
const HASH_LEN: usize = 32;

/// Root hash of the Merkle tree over `level0` (the data blocks' hashes, concatenated).
fn root_hash(level0: Vec<u8>) -> [u8; HASH_LEN] {
    let mut level = level0;
    loop {
        // One hash left: that is the root (a one-block file's root is its block's hash).
        if level.len() == HASH_LEN {
            let mut out = [0u8; HASH_LEN];
            out.copy_from_slice(&level);
            return out;
        }
        let mut next = Vec::with_capacity(level.len().div_ceil(BLOCK_SIZE) * HASH_LEN);
        for chunk in level.chunks(BLOCK_SIZE) {
            let mut block = [0u8; BLOCK_SIZE];
            block[..chunk.len()].copy_from_slice(chunk);
            next.extend_from_slice(digest(&SHA256, &block).as_ref());
        }
        level = next;
    }
}

/// The fs-verity digest (SHA-256) of everything `r` yields.
pub fn digest_reader(mut r: impl Read) -> std::io::Result<[u8; HASH_LEN]> {
    let mut level0 = Vec::new();
    let mut size: u64 = 0;
    let mut block = vec![0u8; BLOCK_SIZE];
    loop {
        // Fill one whole block (short reads are normal on pipes and sockets).
        let mut filled = 0;
        while filled < BLOCK_SIZE {
            match r.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        block[filled..].fill(0);
        level0.extend_from_slice(digest(&SHA256, &block).as_ref());
        size += filled as u64;
        if filled < BLOCK_SIZE {
            break;
        }
    }
    let root = if size == 0 {
        [0u8; HASH_LEN]
    } else {
        root_hash(level0)
    };
    let mut desc = [0u8; 256];
    desc[0] = 1; // version
    desc[1] = 1; // FS_VERITY_HASH_ALG_SHA256
    desc[2] = 12; // log2(4096)
    desc[3] = 0; // salt size
    desc[8..16].copy_from_slice(&size.to_le_bytes());
    desc[16..16 + HASH_LEN].copy_from_slice(&root);
    let mut ctx = Context::new(&SHA256);
    ctx.update(&desc);
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// The fs-verity digest of a file.
pub fn digest_file(path: &Path) -> std::io::Result<[u8; HASH_LEN]> {
    digest_reader(std::io::BufReader::new(std::fs::File::open(path)?))
}

/// Passes what it reads through, feeding a plain SHA-256 on the way.
struct Sha256Tee<R> {
    inner: R,
    ctx: Context,
}

impl<R: Read> Read for Sha256Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.update(&buf[..n]);
        Ok(n)
    }
}

/// Both digests of a file from one read of it: the plain SHA-256 (hex, what an OCI blob is
/// addressed by) and the fs-verity digest. A cached module image is checked against both, and
/// on a verity-enabled file every read costs the kernel a Merkle check too.
pub fn file_digests(path: &Path) -> std::io::Result<(String, [u8; HASH_LEN])> {
    let mut tee = Sha256Tee {
        inner: std::io::BufReader::with_capacity(256 * 1024, std::fs::File::open(path)?),
        ctx: Context::new(&SHA256),
    };
    let fsverity = digest_reader(&mut tee)?;
    let sha: String = tee
        .ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((sha, fsverity))
}

/// `sha256:<hex>`, as `fsverity digest` prints it.
pub fn format(d: &[u8; HASH_LEN]) -> String {
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {

    #[test]
    fn one_read_gives_both_digests() {
        let dir = tempfile::tempdir().expect("dir");
        for len in [0usize, 1, 4095, 4096, 4097, 300_000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let f = dir.path().join(format!("f{len}"));
            std::fs::write(&f, &bytes).expect("write");
            let (sha, v) = file_digests(&f).expect("digests");
            let want_sha: String = digest(&SHA256, &bytes)
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(sha, want_sha, "sha256 of {len} bytes");
            assert_eq!(
                v,
                digest_reader(&bytes[..]).expect("verity"),
                "fs-verity of {len} bytes"
            );
        }
    }

    #[test]
    fn no_kernel_measurement_on_tmpfs() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
        let img = dir.path().join("img");
        std::fs::write(&img, b"module bytes").expect("write");
        assert_eq!(kernel_measurement(&img).expect("no error"), None);
        assert!(kernel_measurement(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn kernel_verity_on_tmpfs_is_unsupported_not_an_error() {
        // /dev/shm is tmpfs everywhere: no fs-verity, whatever the kernel.
        let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
        let f = dir.path().join("img");
        std::fs::write(&f, b"module bytes").expect("write");
        let want = format(&digest_file(&f).expect("digest"));
        match enable_and_measure(&f, &want).expect("no error") {
            KernelVerity::Unsupported(why) => assert!(!why.is_empty()),
            KernelVerity::Enforced => panic!("tmpfs cannot enforce fs-verity"),
        }
    }

    use super::*;

    fn hexdigest(data: &[u8]) -> String {
        format(&digest_reader(data).expect("in-memory read"))
    }

    /// Values printed by `fsverity digest` (fsverity-utils 1.5) for the same contents.
    #[test]
    fn known_vectors() {
        assert_eq!(hexdigest(b""), EMPTY);
        assert_eq!(hexdigest(b"a"), ONE_A);
        assert_eq!(hexdigest(&[0x5a; 4096]), PAGE);
        assert_eq!(hexdigest(&[0x5a; 4097]), PAGE_PLUS_ONE);
    }

    /// A reader that returns one byte per call still gives the same digest.
    #[test]
    fn short_reads() {
        struct OneByte<'a>(&'a [u8]);
        impl Read for OneByte<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                match (self.0.split_first(), buf.first_mut()) {
                    (Some((b, rest)), Some(out)) => {
                        *out = *b;
                        self.0 = rest;
                        Ok(1)
                    }
                    _ => Ok(0),
                }
            }
        }
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let a = digest_reader(OneByte(&data)).expect("read");
        let b = digest_reader(data.as_slice()).expect("read");
        assert_eq!(a, b);
    }

    const EMPTY: &str = "sha256:3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95";
    const ONE_A: &str = "sha256:bce75948b9e7510293f8f2720412af9697c1479281323f3f220623fb8e94b557";
    const PAGE: &str = "sha256:dae733f4cb5a63767cb1041a2bd774ca90c91dfd490554e5edab17886d474600";
    const PAGE_PLUS_ONE: &str =
        "sha256:d2619d9db529bfcc1b0179d7f22a3275ef40456580ebd246fb1c0faa70cc1f6c";
}

/// What the kernel said about fs-verity on a stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelVerity {
    /// Enabled (now or earlier) and the kernel's measurement equals the expected digest: every
    /// later read of the file is verified by the kernel.
    Enforced,
    /// The filesystem cannot do fs-verity (tmpfs, ext4 without `-O verity`, …): the userspace
    /// digest is all there is.
    Unsupported(String),
}

/// Enable fs-verity on `path` (idempotent: an already-verity file is only measured) and compare
/// the kernel's measurement with `expected` (`sha256:<hex>`). A mismatch is an error.
pub fn enable_and_measure(path: &Path, expected: &str) -> std::io::Result<KernelVerity> {
    use nix::errno::Errno;
    let file = std::fs::File::open(path)?;
    match crate::sys::enable_verity(&file) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e @ (Errno::EOPNOTSUPP | Errno::ENOTTY | Errno::EINVAL)) => {
            return Ok(KernelVerity::Unsupported(e.desc().to_string()));
        }
        // Enabling needs the file not open for writing anywhere; any other error is real.
        Err(e) => return Err(std::io::Error::from(e)),
    }
    let (alg, got) = measure(&file)?;
    if alg != 1 || got != expected {
        return Err(std::io::Error::other(format!(
            "the kernel measures {} as {got} (algorithm {alg}), expected {expected}",
            path.display()
        )));
    }
    Ok(KernelVerity::Enforced)
}

/// The kernel's measurement of a verity file: (algorithm, `sha256:<hex>`).
fn measure(file: &std::fs::File) -> std::io::Result<(u16, String)> {
    let (alg, d) = crate::sys::measure_verity(file).map_err(std::io::Error::from)?;
    Ok((
        alg,
        format!(
            "sha256:{}",
            d.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    ))
}

/// The kernel's fs-verity measurement of `path` (`sha256:<hex>`), or `None` when the file has
/// no fs-verity (not enabled, or a filesystem without it). A file with fs-verity is immutable
/// and every read of it is checked against this digest.
pub fn kernel_measurement(path: &Path) -> std::io::Result<Option<String>> {
    use nix::errno::Errno;
    let file = std::fs::File::open(path)?;
    match crate::sys::measure_verity(&file) {
        Ok((1, d)) => Ok(Some(format!(
            "sha256:{}",
            d.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ))),
        Ok((alg, _)) => Err(std::io::Error::other(format!(
            "{} has fs-verity with hash algorithm {alg}, not SHA-256",
            path.display()
        ))),
        Err(Errno::ENODATA | Errno::EOPNOTSUPP | Errno::ENOTTY | Errno::EINVAL) => Ok(None),
        Err(e) => Err(std::io::Error::from(e)),
    }
}
