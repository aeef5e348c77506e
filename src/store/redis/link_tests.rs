//! The pipelined connection against a scripted server on a real socket: replies reach the
//! right callers, and every way a connection goes wrong fails the calls it should and is
//! reopened afterwards.

use super::cluster_path::ClusterPath;
use super::link::LinkError;
use super::request_path::{RequestPath, Target};
use super::resp::{self, Arg, Commands, Reply};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(5);

/// A server that reads commands and answers each as `answer` says (`None`: no reply).
struct Scripted {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Scripted {
    /// The next command's arguments, as text.
    async fn command(&mut self) -> Option<Vec<String>> {
        loop {
            if let Ok(Some((Reply::Array(args), used))) = resp::parse(&self.buf) {
                self.buf.drain(..used);
                return Some(
                    args.into_iter()
                        .map(|a| match a {
                            Reply::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
                            other => format!("{other:?}"),
                        })
                        .collect(),
                );
            }
            if self.stream.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }
}

async fn listener() -> (TcpListener, Target) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let client = redis::Client::open(format!("redis://:s3cret@127.0.0.1:{port}/2")).expect("url");
    (l, Target::of_client(&client).expect("tcp target"))
}

async fn accept(l: &TcpListener) -> Scripted {
    let (stream, _) = l.accept().await.expect("accept");
    Scripted {
        stream,
        buf: Vec::new(),
    }
}

/// Accepts and answers the log-in (`AUTH`, `SELECT 2`) with OK.
async fn logged_in(l: &TcpListener) -> Scripted {
    let mut s = accept(l).await;
    assert_eq!(
        s.command().await,
        Some(vec!["AUTH".into(), "s3cret".into()])
    );
    assert_eq!(s.command().await, Some(vec!["SELECT".into(), "2".into()]));
    s.send(b"+OK\r\n+OK\r\n").await;
    s
}

fn get(key: &str) -> Commands {
    let mut c = Commands::new();
    c.push(&[Arg::Str("GET"), Arg::Str(key)]);
    c
}

#[tokio::test]
async fn concurrent_calls_share_one_connection_and_get_their_own_replies() {
    let (l, target) = listener().await;
    let path = RequestPath::new(target);
    let server = async {
        let mut s = logged_in(&l).await;
        // Read all three calls before answering any: they are in flight together, and the
        // three replies go back in one write.
        let mut keys = Vec::new();
        for _ in 0..3 {
            keys.push(s.command().await.expect("command")[1].clone());
        }
        let mut out = Vec::new();
        for k in &keys {
            out.extend_from_slice(format!("${}\r\n{k}\r\n", k.len()).as_bytes());
        }
        s.send(&out).await;
        s
    };
    let (a, b, c) = (get("a"), get("bb"), get("ccc"));
    // The first call opens the connection; the others wait for it, then ride on it.
    let calls = async {
        tokio::join!(
            path.call(&a, DEADLINE),
            path.call(&b, DEADLINE),
            path.call(&c, DEADLINE)
        )
    };
    let (_server, (ra, rb, rc)) = tokio::join!(server, calls);
    assert_eq!(ra.expect("a"), vec![Reply::Bulk(b"a".to_vec())]);
    assert_eq!(rb.expect("b"), vec![Reply::Bulk(b"bb".to_vec())]);
    assert_eq!(rc.expect("c"), vec![Reply::Bulk(b"ccc".to_vec())]);
}

#[tokio::test]
async fn an_error_reply_fails_its_call_only() {
    let (l, target) = listener().await;
    let path = RequestPath::new(target);
    let server = async {
        let mut s = logged_in(&l).await;
        s.command().await;
        s.command().await;
        s.send(b"-WRONGTYPE Operation against a key\r\n:1\r\n")
            .await;
        s.command().await;
        s.send(b":2\r\n").await;
        s
    };
    let mut two = Commands::new();
    two.push(&[Arg::Str("GET"), Arg::Str("x")])
        .push(&[Arg::Str("INCR"), Arg::Str("y")]);
    let z = get("z");
    let calls = async {
        let failed = path.call(&two, DEADLINE).await;
        let next = path.call(&z, DEADLINE).await;
        (failed, next)
    };
    let (_server, (failed, next)) = tokio::join!(server, calls);
    match failed {
        Err(e @ LinkError::Server(_)) => {
            assert!(!e.is_outage() && !e.never_sent(), "{e}");
            assert_eq!(e.to_string(), "Redis: WRONGTYPE Operation against a key");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        next.expect("the connection still serves"),
        vec![Reply::Int(2)]
    );
}

#[tokio::test]
async fn an_overdue_reply_drops_the_connection_and_the_next_call_reopens_it() {
    let (l, target) = listener().await;
    let path = RequestPath::new(target);
    let server = async {
        let mut first = logged_in(&l).await;
        first.command().await;
        // Never answered. The next connection answers.
        let mut second = logged_in(&l).await;
        assert_eq!(second.command().await.expect("command")[1], "again");
        second.send(b"$-1\r\n").await;
        (first, second)
    };
    let (slow, again) = (get("slow"), get("again"));
    let calls = async {
        let late = path.call(&slow, Duration::from_millis(50)).await;
        let again = path.call(&again, DEADLINE).await;
        (late, again)
    };
    let (_server, (late, again)) = tokio::join!(server, calls);
    assert!(matches!(late, Err(LinkError::Timeout)), "{late:?}");
    assert_eq!(again.expect("reopened"), vec![Reply::Nil]);
}

#[tokio::test]
async fn a_closed_connection_fails_the_calls_in_flight_as_possibly_sent() {
    let (l, target) = listener().await;
    let path = RequestPath::new(target);
    let server = async {
        let mut s = logged_in(&l).await;
        s.command().await;
        drop(s);
    };
    let k = get("k");
    let (_, r) = tokio::join!(server, path.call(&k, DEADLINE));
    match r {
        Err(e @ LinkError::Io(_)) => assert!(e.is_outage() && !e.never_sent(), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_reply_nobody_asked_for_breaks_the_protocol() {
    let (l, target) = listener().await;
    let path = RequestPath::new(target);
    let server = async {
        let mut s = logged_in(&l).await;
        s.command().await;
        s.send(b":1\r\n:2\r\n").await;
        s.command().await.is_none()
    };
    let k = get("k");
    let (closed, first) = tokio::join!(server, path.call(&k, DEADLINE));
    assert_eq!(first.expect("first"), vec![Reply::Int(1)]);
    assert!(closed, "the gateway should have closed the connection");
}

#[tokio::test]
async fn a_refused_log_in_names_the_code_and_no_secret() {
    let (l, target) = listener().await;
    let path = RequestPath::new(target);
    let server = async {
        let mut s = accept(&l).await;
        s.command().await;
        s.command().await;
        s.send(b"-WRONGPASS invalid username-password pair or user is disabled. s3cret\r\n+OK\r\n")
            .await;
        s
    };
    let k = get("k");
    let (_s, r) = tokio::join!(server, path.call(&k, DEADLINE));
    match r {
        Err(e @ LinkError::NotSent(_)) => {
            assert!(e.never_sent() && e.is_outage());
            assert_eq!(
                e.to_string(),
                "not sent to Redis: Redis refused the log-in: WRONGPASS"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_cluster_call_follows_moved_to_the_node_it_names() {
    let first = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let second = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (p1, p2) = (
        first.local_addr().expect("addr").port(),
        second.local_addr().expect("addr").port(),
    );
    let seed = redis::Client::open(format!("redis://127.0.0.1:{p1}")).expect("url");
    let cluster = ClusterPath::new(vec![Target::of_client(&seed).expect("target")]);
    let servers = async {
        // The slot map: every slot on the first node.
        let mut asked = accept(&first).await;
        assert_eq!(
            asked.command().await,
            Some(vec!["CLUSTER".into(), "SLOTS".into()])
        );
        asked
            .send(
                format!(
                    "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:{p1}\r\n$2\r\nid\r\n"
                )
                .as_bytes(),
            )
            .await;
        // The first node has lost the slot to the second.
        let mut s1 = accept(&first).await;
        assert_eq!(s1.command().await.expect("command")[0], "GET");
        s1.send(format!("-MOVED 12182 127.0.0.1:{p2}\r\n").as_bytes())
            .await;
        let mut s2 = accept(&second).await;
        assert_eq!(s2.command().await, Some(vec!["GET".into(), "foo".into()]));
        s2.send(b"$3\r\nbar\r\n").await;
        (asked, s1, s2)
    };
    let foo = get("foo");
    let (_servers, r) = tokio::join!(servers, cluster.call(&foo, DEADLINE));
    assert_eq!(
        r.expect("answered by the second node"),
        vec![Reply::Bulk(b"bar".to_vec())]
    );
}
