//! The on-disk record of the event queue, as pure functions over byte slices.
//!
//! ```text
//! offset  size  field
//!      0     4  magic  "PNEv"
//!      4     4  len    body length, little endian (1 ..= MAX_BODY)
//!      8     4  crc    CRC-32 (IEEE) of seq ‖ body
//!     12     8  seq    sequence number, little endian, strictly increasing within a queue
//!     20   len  body   the event as JSON
//! ```
//!
//! The magic lets a reader that met a damaged record find the next intact one by searching for
//! it instead of testing a CRC at every byte; the CRC covers the sequence number so a stale
//! header glued to another body is caught too. A segment file is just records back to back.

/// Marks the start of every record.
pub const MAGIC: [u8; 4] = *b"PNEv";
pub const HEADER_LEN: usize = 20;
/// Largest body accepted: a 16 KiB payload plus kind, id, source and JSON escaping fits easily.
pub const MAX_BODY: usize = 64 * 1024;

/// Append one record to `out`.
pub fn encode(seq: u64, body: &[u8], out: &mut Vec<u8>) {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(body);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(body);
}

/// What the bytes at the start of a buffer are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// An intact record, `total` bytes long including the header.
    Record {
        seq: u64,
        body: &'a [u8],
        total: usize,
    },
    /// The buffer ends inside what may be a valid record (a write cut short).
    Incomplete,
    /// Not a record: bad magic, impossible length, or CRC mismatch.
    Corrupt(&'static str),
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Decode the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < HEADER_LEN {
        return if MAGIC.starts_with(&buf[..buf.len().min(4)]) {
            Decoded::Incomplete
        } else {
            Decoded::Corrupt("bad magic")
        };
    }
    if buf[..4] != MAGIC {
        return Decoded::Corrupt("bad magic");
    }
    let len = le32(&buf[4..8]) as usize;
    if len == 0 || len > MAX_BODY {
        return Decoded::Corrupt("impossible length");
    }
    let crc = le32(&buf[8..12]);
    let seq_bytes = &buf[12..20];
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Decoded::Incomplete;
    }
    let body = &buf[HEADER_LEN..total];
    let mut h = crc32fast::Hasher::new();
    h.update(seq_bytes);
    h.update(body);
    if h.finalize() != crc {
        return Decoded::Corrupt("CRC mismatch");
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(seq_bytes);
    Decoded::Record {
        seq: u64::from_le_bytes(s),
        body,
        total,
    }
}

/// One intact record found by [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub seq: u64,
    pub offset: usize,
    pub total: usize,
}

/// The result of reading a whole segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub records: Vec<Found>,
    /// End of the last intact record: everything after it is garbage (a torn tail).
    pub valid_end: usize,
    /// Bytes skipped because they were not intact records (middle and tail).
    pub corrupt_bytes: usize,
    /// Damaged regions met (each counted once, however long).
    pub corrupt_regions: usize,
}

/// Read every intact record of a segment in order. A damaged region is skipped by searching for
/// the next magic that starts an intact record with a higher sequence number; damage at the end
/// (a write cut short by a crash) leaves `valid_end` before it. Sequence numbers must increase:
/// a record that goes backwards is treated as damage, never replayed out of order. `after_seq`
/// is the last sequence number of the previous segment (0 for the first; sequences start at 1).
pub fn scan(buf: &[u8], after_seq: u64) -> Scan {
    let mut out = Scan::default();
    let mut last = after_seq;
    let mut pos = 0usize;
    let mut in_damage = false;
    while pos < buf.len() {
        match decode(&buf[pos..]) {
            Decoded::Record { seq, total, .. } if seq > last => {
                out.records.push(Found {
                    seq,
                    offset: pos,
                    total,
                });
                last = seq;
                pos += total;
                out.valid_end = pos;
                in_damage = false;
            }
            _ => {
                if !in_damage {
                    out.corrupt_regions += 1;
                    in_damage = true;
                }
                let next = find_magic(&buf[pos + 1..]).map(|i| pos + 1 + i);
                let stop = next.unwrap_or(buf.len());
                out.corrupt_bytes += stop - pos;
                pos = stop;
            }
        }
    }
    out
}

fn find_magic(buf: &[u8]) -> Option<usize> {
    buf.windows(MAGIC.len()).position(|w| w == MAGIC)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(seq: u64, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode(seq, body, &mut v);
        v
    }

    #[test]
    fn decode_table() {
        let good = rec(7, b"{\"a\":1}");
        let mut bad_crc = good.clone();
        *bad_crc.last_mut().unwrap() ^= 1;
        let mut bad_seq = good.clone();
        bad_seq[12] ^= 1;
        let mut zero_len = good.clone();
        zero_len[4..8].copy_from_slice(&0u32.to_le_bytes());
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&((MAX_BODY + 1) as u32).to_le_bytes());
        let cases: Vec<(&str, Vec<u8>, Decoded<'_>)> = vec![
            ("empty", vec![], Decoded::Incomplete),
            ("partial magic", b"PN".to_vec(), Decoded::Incomplete),
            (
                "header only",
                good[..HEADER_LEN].to_vec(),
                Decoded::Incomplete,
            ),
            (
                "body cut",
                good[..good.len() - 1].to_vec(),
                Decoded::Incomplete,
            ),
            ("zeros", vec![0; 40], Decoded::Corrupt("bad magic")),
            ("bad crc", bad_crc, Decoded::Corrupt("CRC mismatch")),
            (
                "seq covered by crc",
                bad_seq,
                Decoded::Corrupt("CRC mismatch"),
            ),
            (
                "zero length",
                zero_len,
                Decoded::Corrupt("impossible length"),
            ),
            ("huge length", huge, Decoded::Corrupt("impossible length")),
        ];
        for (name, buf, want) in &cases {
            assert_eq!(decode(buf), *want, "{name}");
        }
        match decode(&good) {
            Decoded::Record { seq, body, total } => {
                assert_eq!((seq, body, total), (7, &b"{\"a\":1}"[..], good.len()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scan_clean_and_torn_tail() {
        let mut buf = rec(1, b"a");
        buf.extend(rec(2, b"bb"));
        let clean = scan(&buf, 0);
        assert_eq!(clean.records.len(), 2);
        assert_eq!(clean.valid_end, buf.len());
        assert_eq!(clean.corrupt_regions, 0);
        let end = buf.len();
        let third = rec(3, b"ccc");
        for cut in 1..third.len() {
            let mut torn = buf.clone();
            torn.extend_from_slice(&third[..cut]);
            let s = scan(&torn, 0);
            assert_eq!(s.records.len(), 2, "cut at {cut}");
            assert_eq!(s.valid_end, end, "cut at {cut}");
            assert_eq!(s.corrupt_bytes, cut);
        }
    }

    #[test]
    fn scan_skips_a_corrupt_middle_record() {
        let mut buf = rec(1, b"one");
        let mid = buf.len();
        buf.extend(rec(2, b"two"));
        buf.extend(rec(3, b"three"));
        buf[mid + HEADER_LEN] ^= 0xff; // body byte of record 2
        let s = scan(&buf, 0);
        let seqs: Vec<u64> = s.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 3]);
        assert_eq!(s.corrupt_regions, 1);
        assert_eq!(s.valid_end, buf.len());
        // A damaged length field cannot make the reader skip an intact record either.
        let mut buf2 = rec(1, b"one");
        buf2.extend(rec(2, b"two"));
        buf2.extend(rec(3, b"three"));
        buf2[mid + 4..mid + 8].copy_from_slice(&60_000u32.to_le_bytes());
        let seqs: Vec<u64> = scan(&buf2, 0).records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 3]);
    }

    #[test]
    fn scan_refuses_sequence_going_back() {
        let mut buf = rec(5, b"x");
        buf.extend(rec(4, b"y"));
        buf.extend(rec(6, b"z"));
        let seqs: Vec<u64> = scan(&buf, 0).records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [5, 6]);
        let seqs: Vec<u64> = scan(&buf, 5).records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [6], "a segment continues after the previous one");
    }
}
