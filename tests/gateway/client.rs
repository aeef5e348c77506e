//! A small blocking HTTP/1.1 client that shows the tests the bytes: raw requests, repeated
//! headers, keep-alive connections (ureq serves the CLI; a test must be able to send what no
//! library would).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest response this client accepts.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// A response as received.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in received order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// A kept-alive connection.
pub struct Connection {
    reader: BufReader<TcpStream>,
    host: String,
}

impl Connection {
    pub fn open(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
            host: addr.to_string(),
        })
    }

    /// Sends one request and reads its response.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<HttpResponse> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.host);
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!("content-length: {}\r\n", b.len()));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.unwrap_or_default());
        self.reader.get_mut().write_all(&out)?;
        read_response(&mut self.reader, method == "HEAD")
    }

    /// Writes raw bytes without reading (a request sent in pieces).
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }

    /// Writes raw bytes (for malformed-request tests) and reads one response.
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<HttpResponse> {
        self.reader.get_mut().write_all(bytes)?;
        read_response(&mut self.reader, false)
    }

    /// Reads until the server closes the connection (an end of stream or a reset): what came
    /// before it. An error when it stays open past the read timeout.
    pub fn read_until_closed(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        match self.reader.read_to_end(&mut out) {
            Ok(_) => Ok(out),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(out),
            Err(e) => Err(e),
        }
    }

    /// Writes raw bytes (several requests back to back) and reads responses until the server
    /// closes the connection or `max` have come.
    pub fn pipelined(&mut self, bytes: &[u8], max: usize) -> io::Result<Vec<HttpResponse>> {
        self.reader.get_mut().write_all(bytes)?;
        let mut out = Vec::new();
        while out.len() < max {
            match read_response(&mut self.reader, false) {
                Ok(r) => out.push(r),
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(out)
    }
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<HttpResponse> {
    Connection::open(addr)?.send(method, path, headers, body)
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Reads one response from any byte stream (plain or TLS).
pub fn read_response<R: BufRead>(r: &mut R, head_only: bool) -> io::Result<HttpResponse> {
    let status_line = read_line(r)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or_else(|| bad("bad header line"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut resp = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(resp);
    }
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let size_line = read_line(r)?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                while !read_line(r)?.is_empty() {}
                break;
            }
            if resp.body.len() + size > MAX_BODY {
                return Err(bad("response too large"));
            }
            let start = resp.body.len();
            resp.body.resize(start + size, 0);
            r.read_exact(&mut resp.body[start..])?;
            read_line(r)?;
        }
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        if len > MAX_BODY {
            return Err(bad("response too large"));
        }
        resp.body.resize(len, 0);
        r.read_exact(&mut resp.body)?;
    } else {
        r.take(MAX_BODY as u64).read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}
