//! Address newtypes: every address in a signature says which address it is.
//!
//! - [`OrigDstAddr`]: where the client meant to connect (from `SO_ORIGINAL_DST`, or the explicit
//!   target in explicit mode).
//! - [`ClientAddr`]: the peer address of an accepted connection.
//! - [`ListenAddr`]: the local address a listener is bound to.
//! - [`PortRange`]: an inclusive port range parsed from `22` or `9000-9100`.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// The destination the client originally addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

/// The remote address of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The local address a listener is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

macro_rules! display_inner {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display_inner!(OrigDstAddr, ClientAddr, ListenAddr);

/// An inclusive range of TCP ports, `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// Why a port or range did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortRangeError {
    #[error("`{0}` is not a port number between 1 and 65535")]
    BadPort(String),
    #[error("range `{0}` ends before it starts")]
    Reversed(String),
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(PortRangeError::BadPort(p.trim().to_string())),
        };
        let range = match s.split_once('-') {
            Some((a, b)) => PortRange {
                first: port(a)?,
                last: port(b)?,
            },
            None => {
                let p = port(s)?;
                PortRange { first: p, last: p }
            }
        };
        if range.first > range.last {
            return Err(PortRangeError::Reversed(s.to_string()));
        }
        Ok(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_reject() {
        assert_eq!(
            "22".parse::<PortRange>(),
            Ok(PortRange {
                first: 22,
                last: 22
            })
        );
        assert_eq!(
            "9000-9100".parse::<PortRange>(),
            Ok(PortRange {
                first: 9000,
                last: 9100
            })
        );
        assert!(matches!(
            "70000".parse::<PortRange>(),
            Err(PortRangeError::BadPort(_))
        ));
        assert!(matches!(
            "0".parse::<PortRange>(),
            Err(PortRangeError::BadPort(_))
        ));
        assert!(matches!(
            "90-80".parse::<PortRange>(),
            Err(PortRangeError::Reversed(_))
        ));
        assert_eq!(
            "9000-9100".parse::<PortRange>().map(|r| r.to_string()),
            Ok("9000:9100".into())
        );
    }
}
