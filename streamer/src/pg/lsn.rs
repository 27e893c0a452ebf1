//! PostgreSQL's text for a WAL position, `16/B374D848`: the high and low 32 bits in
//! hex. The server writes it in replication replies and history files, base backups
//! record it, and ebb shows positions that way; the repository stores plain numbers.

use std::fmt;

use catalog::wal::Lsn;

/// A position from its text.
pub fn parse(s: &str) -> Result<Lsn, String> {
    let bad = || format!("invalid LSN {s:?} (expected the form 16/B374D848)");
    let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
    let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
    let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
    Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
}

/// A position, shown as PostgreSQL writes it.
pub fn text(lsn: Lsn) -> LsnText {
    LsnText(lsn)
}

/// See `text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LsnText(pub Lsn);

impl fmt::Display for LsnText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 .0 >> 32, self.0 .0 & 0xffff_ffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_lsn_text() {
        assert_eq!(parse("16/B374D848").unwrap(), Lsn(0x16_B374_D848));
        assert_eq!(text(Lsn(0x16_B374_D848)).to_string(), "16/B374D848");
        assert_eq!(text(Lsn(0)).to_string(), "0/0");
        assert_eq!(parse("0/3001430").unwrap(), Lsn(0x3001430));
        for bad in ["", "16", "16/", "/1", "x/1", "1/100000000", "16/B374D848/1"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
