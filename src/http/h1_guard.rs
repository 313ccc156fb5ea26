//! A read-side guard for HTTP/1 server connections: it follows the request stream's framing
//! (heads, `Content-Length` bodies, chunked bodies) byte by byte as hyper reads it, and makes a
//! head that is ambiguous fail hyper's parser, so hyper answers 400 and closes the connection.
//!
//! Why: hyper accepts a request with both `Content-Length` and `Transfer-Encoding` (RFC 9112
//! §6.1 lets a server resolve it) and drops `Content-Length` from the parsed request, so the
//! service can no longer tell. A proxy must not guess how the next hop frames such a request
//! (request smuggling): it refuses it. The guard turns the head's final line feed into a NUL,
//! which no HTTP/1 parser accepts, only for such heads; every other byte passes unchanged.
//!
//! The guard stops following (and changes nothing more) once the stream leaves plain HTTP/1
//! framing: an `Upgrade`/`CONNECT` request, a head it cannot parse, or one over the limits
//! (hyper then answers those itself). It counts header-count overflows and refusals in
//! [`LimitMetrics`](super::limits::LimitMetrics) through [`ServerLimits`].

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::limits::{Limit, Rejected, ServerLimits};

/// Where the guard is in the request stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Skipping a `Content-Length` body: bytes left.
    Body(u64),
    /// A chunk-size line: the size so far, and whether an extension started.
    ChunkSize { size: u64, digits: bool, ext: bool },
    /// Chunk data: bytes left.
    ChunkData(u64),
    /// The CRLF after chunk data.
    ChunkEnd { cr: bool },
    /// Trailer lines after the last chunk: whether the current line is empty so far.
    Trailers { empty: bool },
    /// Not following any more.
    Passthrough,
}

/// An I/O whose reads are checked by the guard; writes pass through.
pub struct H1Guard<IO> {
    io: IO,
    state: State,
    head: Vec<u8>,
    limits: ServerLimits,
}

impl<IO> H1Guard<IO> {
    pub fn new(io: IO, limits: ServerLimits) -> Self {
        H1Guard {
            io,
            state: State::Head,
            head: Vec::new(),
            limits,
        }
    }

    /// Follows `data` (bytes just read), changing the final byte of an ambiguous head.
    fn follow(&mut self, data: &mut [u8]) {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Passthrough => return,
                State::Head if self.head.is_empty() => {
                    // The usual case, a whole head within one read: checked where it lies.
                    let rest = &data[i..];
                    let Some(head) = scan_head(rest, self.limits.max_headers) else {
                        // Split across reads: collected from its first line on. The empty
                        // lines before it are skipped here, not one rescan of the read each.
                        i += empty_lines(rest);
                        if i < data.len() {
                            self.collect_head(data, &mut i);
                        }
                        continue;
                    };
                    if head.end - head.start - 1 > self.limits.max_head_bytes {
                        self.stop();
                        return;
                    }
                    // A plain head is followed by the next head: the state stays.
                    let poison = !head.plain && self.framed_head(&rest[head.start..head.end]);
                    i += head.end;
                    if poison {
                        data[i - 1] = 0;
                    }
                }
                State::Head => self.collect_head(data, &mut i),
                State::Body(left) => {
                    let n = left.min((data.len() - i) as u64);
                    i += n as usize;
                    self.state = if left == n {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                }
                State::ChunkSize { size, digits, ext } => {
                    let b = data[i];
                    i += 1;
                    self.state = match b {
                        b'\n' if digits => {
                            if size == 0 {
                                State::Trailers { empty: true }
                            } else {
                                State::ChunkData(size)
                            }
                        }
                        _ if ext => State::ChunkSize { size, digits, ext },
                        b';' | b' ' | b'\t' | b'\r' if digits => State::ChunkSize {
                            size,
                            digits,
                            ext: true,
                        },
                        _ => match (b as char).to_digit(16) {
                            Some(d) => match size.checked_mul(16) {
                                Some(s) => State::ChunkSize {
                                    size: s + u64::from(d),
                                    digits: true,
                                    ext,
                                },
                                None => State::Passthrough,
                            },
                            None => State::Passthrough,
                        },
                    };
                }
                State::ChunkData(left) => {
                    let n = left.min((data.len() - i) as u64);
                    i += n as usize;
                    self.state = if left == n {
                        State::ChunkEnd { cr: false }
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::ChunkEnd { cr } => {
                    let b = data[i];
                    i += 1;
                    self.state = match (b, cr) {
                        (b'\r', false) => State::ChunkEnd { cr: true },
                        (b'\n', _) => State::ChunkSize {
                            size: 0,
                            digits: false,
                            ext: false,
                        },
                        _ => State::Passthrough,
                    };
                }
                State::Trailers { empty } => {
                    let b = data[i];
                    i += 1;
                    self.state = match b {
                        b'\n' if empty => State::Head,
                        b'\n' => State::Trailers { empty: true },
                        b'\r' => State::Trailers { empty },
                        _ => State::Trailers { empty: false },
                    };
                }
            }
        }
    }

    /// Copies the head's bytes from `data[*i..]` up to the next line feed (a head split across
    /// reads), checking it once it is complete.
    fn collect_head(&mut self, data: &mut [u8], i: &mut usize) {
        let rest = &data[*i..];
        let Some(nl) = memchr::memchr(b'\n', rest) else {
            self.head.extend_from_slice(rest);
            *i = data.len();
            if self.head.len() > self.limits.max_head_bytes {
                self.stop();
            }
            return;
        };
        self.head.extend_from_slice(&rest[..=nl]);
        *i += nl + 1;
        if self.head.len() - 1 > self.limits.max_head_bytes {
            self.stop();
            return;
        }
        // Empty lines before a request line are skipped by parsers.
        if self.head == b"\n" || self.head == b"\r\n" {
            self.head.clear();
            return;
        }
        if self.head.ends_with(b"\n\n") || self.head.ends_with(b"\n\r\n") {
            let head = std::mem::take(&mut self.head);
            if !plain_head(&head, self.limits.max_headers) && self.framed_head(&head) {
                data[*i - 1] = 0;
            }
            // The allocation is kept for the next split head.
            if self.state != State::Passthrough {
                self.head = head;
                self.head.clear();
            }
        }
    }

    fn stop(&mut self) {
        self.state = State::Passthrough;
        self.head = Vec::new();
    }

    /// Parses a complete head that is not plain and picks the next state from its framing.
    /// `true`: the head is ambiguous and must be refused.
    fn framed_head(&mut self, head: &[u8]) -> bool {
        let mut headers = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = req.parse(head);
        let framing = match parsed {
            Ok(httparse::Status::Complete(_)) => {
                let (mut cl, mut te, mut upgrade) = (Vec::new(), Vec::new(), false);
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        cl.push(h.value);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        te.push(h.value);
                    } else if h.name.eq_ignore_ascii_case("upgrade") {
                        upgrade = true;
                    }
                }
                if !cl.is_empty() && !te.is_empty() {
                    self.limits.rejected(Rejected::ambiguous_framing);
                    tracing::info!(
                        "request with both Content-Length and Transfer-Encoding refused"
                    );
                    self.stop();
                    return true;
                }
                let connect = req
                    .method
                    .is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"));
                if upgrade || connect {
                    None
                } else if let Some(last) = te.last() {
                    let chunked = last
                        .rsplit(|b| *b == b',')
                        .next()
                        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                    chunked.then_some(State::ChunkSize {
                        size: 0,
                        digits: false,
                        ext: false,
                    })
                } else if let Some(v) = cl.first() {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|n| if n == 0 { State::Head } else { State::Body(n) })
                } else {
                    Some(State::Head)
                }
            }
            Err(httparse::Error::TooManyHeaders) => {
                self.limits.exceeded(Limit::header_count);
                None
            }
            _ => None,
        };
        match framing {
            Some(next) => self.state = next,
            None => self.stop(),
        }
        false
    }
}

/// A complete head found in a read: where it lies, and whether it is plain.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// After any empty lines before the request line (parsers skip them).
    start: usize,
    /// Just after the empty line that ends the head.
    end: usize,
    /// The head certainly has no framing to follow (see [`scan_head`]).
    plain: bool,
}

/// Finds the first complete head in `data`, in one pass over its lines.
///
/// It is plain when it has no `CONNECT`, at most `max_headers` header lines, and none of them
/// (or a continuation of one) is `Content-Length`, `Transfer-Encoding` or `Upgrade`. Such a head
/// (the usual `GET`) is followed by the next head, as a full parse would find; anything else
/// is parsed in full. A head this scan calls plain that hyper's parser rejects ends the
/// connection anyway.
fn scan_head(data: &[u8], max_headers: usize) -> Option<Head> {
    /// Whether `line` starts with the header name `name` (lower case) followed by `:` or
    /// whitespace (a name merely beginning with it, like `Upgrade-Insecure-Requests`, differs).
    fn names(line: &[u8], name: &[u8]) -> bool {
        line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && matches!(line[name.len()], b':' | b' ' | b'\t')
    }
    /// Whether a header line may carry framing.
    fn framing(line: &[u8]) -> bool {
        let Some(first) = line.first() else {
            return false;
        };
        match first.to_ascii_lowercase() {
            b'c' => names(line, b"content-length"),
            b't' => names(line, b"transfer-encoding"),
            b'u' => names(line, b"upgrade"),
            b if b.is_ascii_alphanumeric() => false,
            // Whitespace (a folded line) or anything unusual: let the parser decide.
            _ => !matches!(
                first,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            ),
        }
    }
    let start = empty_lines(data);
    let mut from = start;
    let mut count = 0;
    let mut plain = true;
    for nl in memchr::memchr_iter(b'\n', &data[start..]) {
        let nl = start + nl;
        let line = &data[from..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if from == start {
            plain = !(line.len() >= 7 && line[..7].eq_ignore_ascii_case(b"CONNECT"));
        } else if line.is_empty() {
            return Some(Head {
                start,
                end: nl + 1,
                plain,
            });
        } else if plain {
            count += 1;
            plain = count <= max_headers && !framing(line);
        }
        from = nl + 1;
    }
    None
}

/// The length of the empty lines (`\n` or `\r\n`) `data` starts with: parsers skip them before
/// a request line.
fn empty_lines(data: &[u8]) -> usize {
    let mut start = 0;
    loop {
        match &data[start..] {
            [b'\n', ..] => start += 1,
            [b'\r', b'\n', ..] => start += 2,
            _ => return start,
        }
    }
}

/// Whether a complete head (as [`H1Guard`] collected it) is plain (see [`scan_head`]).
fn plain_head(head: &[u8], max_headers: usize) -> bool {
    scan_head(head, max_headers).is_some_and(|h| h.plain)
}

impl<IO: AsyncRead + Unpin> AsyncRead for H1Guard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if this.state != State::Passthrough {
                let filled = buf.filled_mut();
                let new = &mut filled[before..];
                this.follow(new);
            }
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for H1Guard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyConfig;
    use crate::http::limits::LimitMetrics;
    use crate::metrics::Direction;

    fn guard() -> H1Guard<()> {
        let limits = ServerLimits::new(
            &ProxyConfig::loopback(),
            Direction::inbound,
            LimitMetrics::default(),
        );
        H1Guard::new((), limits)
    }

    /// Feeds `input` split at every `step` bytes; returns the bytes as hyper would read them.
    fn run(input: &[u8], step: usize) -> Vec<u8> {
        let mut g = guard();
        let mut out = Vec::new();
        for chunk in input.chunks(step) {
            let mut c = chunk.to_vec();
            g.follow(&mut c);
            out.extend(c);
        }
        out
    }

    #[test]
    fn only_ambiguous_heads_change_however_they_are_split() {
        let clean: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\r\nGET / HTTP/1.1\nHost: a\n\n",
        ];
        for input in clean {
            for step in [1, 2, 7, input.len()] {
                assert_eq!(&run(input, step)[..], *input, "step {step}");
            }
        }
        // CL + TE in the second request of a keep-alive connection, behind a chunked body that
        // contains a fake head: only the real second head is poisoned.
        let input: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n18\r\nGET / HTTP/1.1\r\nX: 1\r\n\r\n\r\n0\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for step in [1, 3, input.len()] {
            let out = run(input, step);
            let diff: Vec<usize> = (0..input.len()).filter(|i| out[*i] != input[*i]).collect();
            let end = input.len() - "0\r\n\r\n".len() - 1;
            assert_eq!(diff, vec![end], "step {step}");
            assert_eq!(out[end], 0);
        }
    }

    #[test]
    fn empty_lines_before_a_split_head_are_skipped_once() {
        // Thousands of empty lines, then a head split across two reads whose framing is
        // ambiguous: still poisoned, and the empty lines pass unchanged.
        let mut input = b"\r\n".repeat(4000);
        input.extend_from_slice(
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let first = input.len() - 20;
        let mut g = guard();
        let (mut a, mut b) = (input[..first].to_vec(), input[first..].to_vec());
        g.follow(&mut a);
        g.follow(&mut b);
        assert_eq!(a, input[..first]);
        assert_eq!(b.last(), Some(&0), "the ambiguous head is refused");
    }

    #[test]
    fn a_whole_head_is_found_where_it_lies() {
        let at = |start, end, plain| Some(Head { start, end, plain });
        let cases: &[(&[u8], Option<Head>)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET", at(0, 27, true)),
            (b"\r\n\nGET / HTTP/1.1\nHost: a\n\nx", at(3, 27, true)),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
                at(0, 37, false),
            ),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r", None),
            (b"GET / HTTP/1.1\r\nHost: a\r\n", None),
            (b"\r\n", None),
            (b"", None),
        ];
        for (data, want) in cases {
            assert_eq!(
                scan_head(data, 100),
                *want,
                "{}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn a_head_over_the_size_limit_is_left_to_the_parser_however_it_arrives() {
        let mut head =
            b"GET / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nX: ".to_vec();
        let max = guard().limits.max_head_bytes;
        head.resize(max + 10, b'a');
        head.extend_from_slice(b"\r\n\r\n0\r\n\r\n");
        // Over the limit, the guard stops following: hyper answers 431 for the size and the
        // ambiguous framing is never forwarded; the bytes pass unchanged.
        for step in [1, 100, head.len()] {
            assert_eq!(run(&head, step), head, "step {step}");
        }
    }

    #[test]
    fn only_heads_without_framing_skip_the_full_parse() {
        let plain: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade-Insecure-Requests: 1\r\nContent-Type: x\r\n\r\n",
            b"GET / HTTP/1.1\nhost: a\nx-content-length: 5\n\n",
        ];
        for head in plain {
            assert!(plain_head(head, 100), "{}", String::from_utf8_lossy(head));
        }
        let framed: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nHost: a\r\ncontent-LENGTH: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade:\twebsocket\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        ];
        for head in framed {
            assert!(!plain_head(head, 100), "{}", String::from_utf8_lossy(head));
        }
        // Over the header count: the full parse counts it.
        assert!(!plain_head(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", 1));
        assert!(plain_head(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", 2));
    }
}
