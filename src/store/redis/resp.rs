//! RESP2, as much as the request path needs: commands written as arrays of bulk strings straight
//! into one buffer, and replies read incrementally from a byte buffer, every size bounded.

use std::fmt;

/// The largest bulk string a reply may carry (records are a few hundred bytes).
pub(super) const MAX_BULK: usize = 1 << 20;
/// The most elements an array reply may have, and how deeply arrays may nest.
const MAX_ARRAY: usize = 16_384;
const MAX_DEPTH: usize = 4;
/// The longest `+`, `-` or `:` line, and the longest length header.
const MAX_LINE: usize = 4096;

/// Keys have at most this many parts; more are joined through a copy.
const CONCAT_PARTS: usize = 6;

/// One command argument; `Concat` writes its parts as one argument (a key built without an
/// allocation).
#[derive(Clone, Copy)]
pub(super) enum Arg<'a> {
    Str(&'a str),
    Concat(&'a [&'a str]),
    Int(i64),
    UInt(u64),
}

/// Commands to send as one pipeline, already encoded.
#[derive(Default)]
pub(super) struct Commands {
    buf: Vec<u8>,
    count: usize,
    /// Where the first command's first argument (its key) lies in `buf`.
    first_key: Option<(usize, usize)>,
}

impl Commands {
    pub(super) fn new() -> Self {
        Self {
            // The admission's pipeline, expiry and touch included, takes about 300 bytes.
            buf: Vec::with_capacity(512),
            count: 0,
            first_key: None,
        }
    }

    /// Appends one command (its name is the first argument).
    pub(super) fn push(&mut self, args: &[Arg<'_>]) -> &mut Self {
        self.header(b'*', args.len());
        for (i, arg) in args.iter().enumerate() {
            let payload = self.arg(arg);
            if self.count == 0 && i == 1 {
                self.first_key = Some(payload);
            }
        }
        self.count += 1;
        self
    }

    /// Writes one argument as a bulk string; where its payload lies in `buf`.
    fn arg(&mut self, arg: &Arg<'_>) -> (usize, usize) {
        match *arg {
            Arg::Str(s) => self.bulk(&[s.as_bytes()]),
            Arg::Concat(parts) if parts.len() <= CONCAT_PARTS => {
                let mut p: [&[u8]; CONCAT_PARTS] = [&[]; CONCAT_PARTS];
                for (slot, part) in p.iter_mut().zip(parts) {
                    *slot = part.as_bytes();
                }
                self.bulk(&p[..parts.len()])
            }
            Arg::Concat(parts) => self.bulk(&[parts.concat().as_bytes()]),
            Arg::Int(n) => self.bulk(&[itoa::Buffer::new().format(n).as_bytes()]),
            Arg::UInt(n) => self.bulk(&[itoa::Buffer::new().format(n).as_bytes()]),
        }
    }

    /// The first command's key (its first argument): what a cluster routes the pipeline by.
    pub(super) fn first_key(&self) -> Option<&[u8]> {
        self.first_key.and_then(|(a, b)| self.buf.get(a..b))
    }

    /// `<kind><len>\r\n`; lengths under 100 (nearly all) as one small fixed-size write.
    fn header(&mut self, kind: u8, len: usize) {
        match u8::try_from(len) {
            Ok(n) if n < 10 => self.buf.extend_from_slice(&[kind, b'0' + n, b'\r', b'\n']),
            Ok(n) if n < 100 => {
                self.buf
                    .extend_from_slice(&[kind, b'0' + n / 10, b'0' + n % 10, b'\r', b'\n']);
            }
            _ => {
                self.buf.push(kind);
                self.buf
                    .extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
                self.buf.extend_from_slice(b"\r\n");
            }
        }
    }

    /// One bulk string of `parts` joined; where its payload lies in `buf`.
    fn bulk(&mut self, parts: &[&[u8]]) -> (usize, usize) {
        self.header(b'$', parts.iter().map(|p| p.len()).sum());
        let start = self.buf.len();
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        let end = self.buf.len();
        self.buf.extend_from_slice(b"\r\n");
        (start, end)
    }

    /// How many commands, hence how many replies.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Reply {
    Status(String),
    Error(ServerError),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Reply>),
}

/// An error reply: its code (the first word, `READONLY`, `WRONGTYPE`...) and the whole text.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ServerError(pub(super) String);

impl ServerError {
    pub(super) fn code(&self) -> &str {
        self.0.split(' ').next().unwrap_or("")
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Reply {
    /// A bulk string holding a number (`ZINCRBY`'s score) or an integer, as `f64`.
    pub(super) fn as_f64(&self) -> Option<f64> {
        match self {
            Reply::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            Reply::Int(n) => Some(*n as f64),
            _ => None,
        }
    }

    pub(super) fn as_i64(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            Reply::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }
}

/// A reply that breaks the protocol or a bound: the connection cannot be trusted after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProtocolError(pub(super) &'static str);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad reply from Redis: {}", self.0)
    }
}

/// Reads one reply from the start of `buf`: the reply and the bytes it took, or `None` until
/// the buffer holds all of it.
pub(super) fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    parse_at(buf, 0)
}

fn parse_at(buf: &[u8], depth: usize) -> Result<Option<(Reply, usize)>, ProtocolError> {
    let Some((&kind, body)) = buf.split_first() else {
        return Ok(None);
    };
    let Some((line, after)) = line(body)? else {
        return Ok(None);
    };
    let used = 1 + after;
    let text = || {
        std::str::from_utf8(line)
            .map(str::to_owned)
            .map_err(|_| ProtocolError("a line is not UTF-8"))
    };
    Ok(Some(match kind {
        b'+' => (Reply::Status(text()?), used),
        b'-' => (Reply::Error(ServerError(text()?)), used),
        b':' => (Reply::Int(integer(line)?), used),
        b'$' => match integer(line)? {
            -1 => (Reply::Nil, used),
            n if n < 0 || n as usize > MAX_BULK => {
                return Err(ProtocolError("bulk length out of bounds"))
            }
            n => {
                let n = n as usize;
                let Some(data) = buf.get(used..used + n + 2) else {
                    return Ok(None);
                };
                if &data[n..] != b"\r\n" {
                    return Err(ProtocolError("bulk string not ended by CRLF"));
                }
                (Reply::Bulk(data[..n].to_vec()), used + n + 2)
            }
        },
        b'*' => match integer(line)? {
            -1 => (Reply::Nil, used),
            n if n < 0 || n as usize > MAX_ARRAY => {
                return Err(ProtocolError("array length out of bounds"))
            }
            _ if depth >= MAX_DEPTH => return Err(ProtocolError("arrays nested too deeply")),
            n => {
                let mut items = Vec::with_capacity((n as usize).min(64));
                let mut at = used;
                for _ in 0..n {
                    let Some((item, took)) = parse_at(&buf[at..], depth + 1)? else {
                        return Ok(None);
                    };
                    items.push(item);
                    at += took;
                }
                (Reply::Array(items), at)
            }
        },
        _ => return Err(ProtocolError("unknown reply type")),
    }))
}

/// The line up to CRLF and the offset just past it, or `None` if the CRLF has not arrived.
fn line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    match buf.iter().take(MAX_LINE + 1).position(|&b| b == b'\r') {
        Some(i) => match buf.get(i + 1) {
            Some(b'\n') => Ok(Some((&buf[..i], i + 2))),
            Some(_) => Err(ProtocolError("CR without LF")),
            None => Ok(None),
        },
        None if buf.len() > MAX_LINE => Err(ProtocolError("line too long")),
        None => Ok(None),
    }
}

fn integer(line: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProtocolError("not an integer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut c = Commands::new();
        c.push(&[
            Arg::Str("ZADD"),
            Arg::Concat(&["mf:{a:", "acme", "}:tat:", "k1"]),
            Arg::UInt(7),
            Arg::Int(-3),
        ])
        .push(&[Arg::Str("INCR"), Arg::Str("q")]);
        assert_eq!(
            c.bytes(),
            b"*4\r\n$4\r\nZADD\r\n$18\r\nmf:{a:acme}:tat:k1\r\n$1\r\n7\r\n$2\r\n-3\r\n\
              *2\r\n$4\r\nINCR\r\n$1\r\nq\r\n"
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c.first_key(), Some(&b"mf:{a:acme}:tat:k1"[..]));
        for n in [0, 9, 10, 99, 100, 12_345] {
            let payload = "x".repeat(n);
            let mut one = Commands::new();
            one.push(&[Arg::Str(&payload)]);
            assert_eq!(
                one.bytes(),
                format!("*1\r\n${n}\r\n{payload}\r\n").as_bytes()
            );
        }
        let joined = ["a"; 9];
        let mut long = Commands::new();
        long.push(&[Arg::Concat(&joined)]);
        assert_eq!(long.bytes(), b"*1\r\n$9\r\naaaaaaaaa\r\n");
    }

    proptest! {
        /// Every command is written byte for byte as redis-rs writes it.
        #[test]
        fn commands_are_written_as_redis_rs_writes_them(
            name in "[A-Z]{1,8}",
            key in proptest::collection::vec("[a-z:{}]{0,12}", 1..5),
            text in ".{0,120}",
            signed: i64,
            unsigned: u64,
        ) {
            let parts: Vec<&str> = key.iter().map(String::as_str).collect();
            let mut c = Commands::new();
            c.push(&[
                Arg::Str(&name),
                Arg::Concat(&parts),
                Arg::Str(&text),
                Arg::Int(signed),
                Arg::UInt(unsigned),
            ]);
            let joined = key.concat();
            let expected = redis::cmd(&name)
                .arg(&joined)
                .arg(&text)
                .arg(signed)
                .arg(unsigned)
                .get_packed_command();
            prop_assert_eq!(c.bytes(), &expected[..]);
            prop_assert_eq!(c.first_key(), Some(joined.as_bytes()));
        }
    }

    #[test]
    fn replies_of_every_kind_are_read() {
        let cases: [(&[u8], Reply); 7] = [
            (b"+OK\r\n", Reply::Status("OK".into())),
            (
                b"-READONLY You can't write\r\n",
                Reply::Error(ServerError("READONLY You can't write".into())),
            ),
            (b":-42\r\n", Reply::Int(-42)),
            (b"$3\r\na\r\n\r\n", Reply::Bulk(b"a\r\n".to_vec())),
            (b"$-1\r\n", Reply::Nil),
            (b"*-1\r\n", Reply::Nil),
            (
                b"*2\r\n:1\r\n$0\r\n\r\n",
                Reply::Array(vec![Reply::Int(1), Reply::Bulk(vec![])]),
            ),
        ];
        for (bytes, want) in cases {
            let mut with_more = bytes.to_vec();
            with_more.extend_from_slice(b":9\r\n");
            assert_eq!(parse(&with_more), Ok(Some((want, bytes.len()))));
        }
        let error = ServerError("READONLY You can't write".into());
        assert_eq!(error.code(), "READONLY");
    }

    #[test]
    fn hostile_replies_break_the_protocol_instead_of_growing_buffers() {
        for bad in [
            &b"$2000000\r\n"[..],
            b"$-2\r\n",
            b"*20000\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
            b"$1\r\nab\r\n",
            b":12x\r\n",
            b"+OK\rX",
            b"!3\r\nabc\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse(&[b'+'; MAX_LINE + 2]).is_err());
    }

    fn reply() -> impl Strategy<Value = Reply> {
        let leaf = prop_oneof![
            "[a-zA-Z0-9 ]{0,20}".prop_map(Reply::Status),
            "[A-Z]{1,9} [a-z ]{0,20}".prop_map(|s| Reply::Error(ServerError(s))),
            any::<i64>().prop_map(Reply::Int),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(Reply::Bulk),
            Just(Reply::Nil),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(Reply::Array)
        })
    }

    fn encode(r: &Reply, out: &mut Vec<u8>) {
        match r {
            Reply::Status(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Reply::Error(e) => out.extend_from_slice(format!("-{}\r\n", e.0).as_bytes()),
            Reply::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Reply::Bulk(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Nil => out.extend_from_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for i in items {
                    encode(i, out);
                }
            }
        }
    }

    proptest! {
        /// Every reply reads back whole, and no strict prefix of it reads as a reply.
        #[test]
        fn replies_read_back_and_prefixes_wait(r in reply()) {
            let mut bytes = Vec::new();
            encode(&r, &mut bytes);
            prop_assert_eq!(parse(&bytes), Ok(Some((r, bytes.len()))));
            for cut in 0..bytes.len() {
                prop_assert_eq!(parse(&bytes[..cut]), Ok(None));
            }
        }

        /// Arbitrary bytes never panic the reader and never claim more than they hold.
        #[test]
        fn arbitrary_bytes_are_read_safely(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Some((_, used))) = parse(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }
    }
}
