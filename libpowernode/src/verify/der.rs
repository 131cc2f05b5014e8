//! A minimal DER reader/writer: just enough to walk CMS/RFC 3161 structures and to rebuild a
//! certificate's TBS without its SCT extension. Single-byte tags only (all that X.509 and CMS
//! use here); lengths up to 4 bytes.

use super::{VerifyError, VerifyErrorKind};

pub const SEQUENCE: u8 = 0x30;
pub const SET: u8 = 0x31;
pub const INTEGER: u8 = 0x02;
pub const OCTET_STRING: u8 = 0x04;
pub const OID: u8 = 0x06;
pub const GENERALIZED_TIME: u8 = 0x18;

/// One TLV element.
#[derive(Debug, Clone, Copy)]
pub struct Tlv<'a> {
    pub tag: u8,
    /// The content octets.
    pub value: &'a [u8],
    /// The whole element, header included.
    pub raw: &'a [u8],
}

fn err(what: &str) -> VerifyError {
    VerifyError::new(VerifyErrorKind::Malformed, format!("malformed DER: {what}"))
}

/// Reads one element from the front of `input`; returns it and the rest.
pub fn read(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), VerifyError> {
    let (&tag, rest) = input.split_first().ok_or_else(|| err("truncated tag"))?;
    if tag & 0x1f == 0x1f {
        return Err(err("multi-byte tags are not supported"));
    }
    let (&first, rest) = rest.split_first().ok_or_else(|| err("truncated length"))?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(err("bad length"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(err("truncated content"));
    }
    let header = input.len() - rest.len();
    let value = &rest[..len];
    Ok((
        Tlv {
            tag,
            value,
            raw: &input[..header + len],
        },
        &rest[len..],
    ))
}

/// Reads exactly one element spanning all of `input`.
pub fn read_all(input: &[u8]) -> Result<Tlv<'_>, VerifyError> {
    let (tlv, rest) = read(input)?;
    if !rest.is_empty() {
        return Err(err("trailing data"));
    }
    Ok(tlv)
}

/// Reads one element that must carry `tag`.
pub fn expect(input: &[u8], tag: u8) -> Result<(Tlv<'_>, &[u8]), VerifyError> {
    let (tlv, rest) = read(input)?;
    if tlv.tag != tag {
        return Err(err(&format!(
            "expected tag {tag:#04x}, found {:#04x}",
            tlv.tag
        )));
    }
    Ok((tlv, rest))
}

/// The children of a constructed element's content.
pub fn children(mut content: &[u8]) -> Result<Vec<Tlv<'_>>, VerifyError> {
    let mut out = Vec::new();
    while !content.is_empty() {
        let (tlv, rest) = read(content)?;
        out.push(tlv);
        content = rest;
    }
    Ok(out)
}

/// Encodes a TLV.
pub fn encode(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(value);
    out
}

/// DER encoding of a dotted OID's content octets (for comparisons).
pub fn oid_bytes(dotted: &str) -> Vec<u8> {
    let arcs: Vec<u64> = dotted.split('.').filter_map(|a| a.parse().ok()).collect();
    let mut out = Vec::new();
    if arcs.len() < 2 {
        return out;
    }
    let mut push = |mut v: u64| {
        let mut tmp = vec![(v & 0x7f) as u8];
        v >>= 7;
        while v > 0 {
            tmp.push(0x80 | (v & 0x7f) as u8);
            v >>= 7;
        }
        tmp.reverse();
        out.extend(tmp);
    };
    push(arcs[0] * 40 + arcs[1]);
    for &a in &arcs[2..] {
        push(a);
    }
    out
}

/// Parses a GeneralizedTime (`YYYYMMDDHHMMSS[.fff]Z`) into Unix seconds (fraction dropped).
pub fn generalized_time(value: &[u8]) -> Result<i64, VerifyError> {
    let s = std::str::from_utf8(value).map_err(|_| err("GeneralizedTime is not ASCII"))?;
    let s = s
        .strip_suffix('Z')
        .ok_or_else(|| err("GeneralizedTime not in UTC"))?;
    let main = s.split('.').next().unwrap_or_default();
    if main.len() != 14 || !main.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("bad GeneralizedTime"));
    }
    let n = |r: std::ops::Range<usize>| main[r].parse::<i64>().unwrap_or_default();
    let (y, mo, d, h, mi, se) = (n(0..4), n(4..6), n(6..8), n(8..10), n(10..12), n(12..14));
    let month = time::Month::try_from(mo as u8).map_err(|_| err("bad month"))?;
    let date =
        time::Date::from_calendar_date(y as i32, month, d as u8).map_err(|_| err("bad date"))?;
    let t = date
        .with_hms(h as u8, mi as u8, se as u8)
        .map_err(|_| err("bad time"))?;
    Ok(t.assume_utc().unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_long_lengths() {
        let v = vec![7u8; 300];
        let enc = encode(SEQUENCE, &v);
        assert_eq!(&enc[..4], &[0x30, 0x82, 0x01, 0x2c]);
        let t = read_all(&enc).expect("parse");
        assert_eq!(t.value.len(), 300);
        assert_eq!(t.raw.len(), enc.len());
    }

    #[test]
    fn oid_encoding() {
        // 1.3.6.1.4.1.11129.2.4.2 (embedded SCT list)
        assert_eq!(
            oid_bytes("1.3.6.1.4.1.11129.2.4.2"),
            [0x2b, 0x06, 0x01, 0x04, 0x01, 0xd6, 0x79, 0x02, 0x04, 0x02]
        );
    }

    #[test]
    fn generalized_time_parses() {
        assert_eq!(
            generalized_time(b"20250612120220Z").expect("time"),
            1_749_729_740
        );
        assert_eq!(
            generalized_time(b"20250612120220.123Z").expect("time"),
            1_749_729_740
        );
        assert!(generalized_time(b"2025061212022Z").is_err());
    }

    #[test]
    fn truncated_is_rejected() {
        assert!(read(&[0x30, 0x05, 0x01]).is_err());
        assert!(read(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
