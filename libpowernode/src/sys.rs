//! The only `unsafe` in the workspace: the two fs-verity ioctls (linux/fsverity.h), which no
//! safe crate wraps. Everything else reaches the kernel through nix, std and tokio.
//!
//! `FS_IOC_ENABLE_VERITY` builds the Merkle tree and makes the file read-only and verified on
//! every read from then on; `FS_IOC_MEASURE_VERITY` returns the file digest the kernel
//! enforces. Both take a file descriptor we own for the duration of the call and a pointer to
//! a properly sized, initialised `repr(C)` struct on our stack.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

/// `struct fsverity_enable_arg` (linux/fsverity.h).
#[repr(C)]
pub struct EnableArg {
    pub version: u32,
    pub hash_algorithm: u32,
    pub block_size: u32,
    pub salt_size: u32,
    pub salt_ptr: u64,
    pub sig_size: u32,
    pub reserved1: u32,
    pub sig_ptr: u64,
    pub reserved2: [u64; 11],
}

/// `struct fsverity_digest` (4-byte header + flexible array) with room for the largest digest
/// (SHA-512).
#[repr(C)]
pub struct Digest {
    pub digest_algorithm: u16,
    pub digest_size: u16,
    pub digest: [u8; 64],
}

nix::ioctl_write_ptr!(fs_ioc_enable_verity, b'f', 133, EnableArg);
// The kernel's struct ends in a flexible array, so the request code carries its fixed 4-byte
// header size, not the size of our buffer-carrying struct.
nix::ioctl_readwrite_bad!(
    fs_ioc_measure_verity,
    nix::request_code_readwrite!(b'f', 134, 4),
    Digest
);

/// FS_IOC_ENABLE_VERITY with SHA-256 (algorithm 1), 4096-byte blocks, no salt, no signature.
pub fn enable_verity(file: &std::fs::File) -> nix::Result<()> {
    let arg = EnableArg {
        version: 1,
        hash_algorithm: 1,
        block_size: 4096,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    // SAFETY: the fd is open for the whole call; `arg` is a fully initialised repr(C) struct
    // matching the kernel's layout, and its salt/signature pointers are null with zero sizes.
    unsafe { fs_ioc_enable_verity(file.as_raw_fd(), &arg) }.map(|_| ())
}

/// FS_IOC_MEASURE_VERITY: (algorithm, digest) of a verity file.
pub fn measure_verity(file: &std::fs::File) -> nix::Result<(u16, Vec<u8>)> {
    let mut d = Digest {
        digest_algorithm: 0,
        digest_size: 64,
        digest: [0; 64],
    };
    // SAFETY: the fd is open for the whole call; `d` is repr(C) with `digest_size` telling the
    // kernel how many bytes `digest` can hold, which it never exceeds.
    unsafe { fs_ioc_measure_verity(file.as_raw_fd(), &mut d) }?;
    let n = usize::from(d.digest_size).min(d.digest.len());
    Ok((d.digest_algorithm, d.digest[..n].to_vec()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_codes_match_linux_fsverity_h() {
        // _IOW('f', 133, struct fsverity_enable_arg /* 128 bytes */) and
        // _IOWR('f', 134, struct fsverity_digest /* 4 bytes */), as the kernel headers define.
        assert_eq!(std::mem::size_of::<super::EnableArg>(), 128);
        assert_eq!(nix::request_code_write!(b'f', 133, 128), 0x4080_6685);
        assert_eq!(nix::request_code_readwrite!(b'f', 134, 4), 0xc004_6686);
    }
}
