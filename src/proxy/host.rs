//! `server.hosts`: the host names a request may name. A backend that builds links from `Host`
//! (a password reset mail, a verification link) would otherwise build them to the client's
//! choice.

use pingora::http::RequestHeader;

/// Whether the request names one of `hosts` (any when empty): the authority of an
/// absolute-form target or HTTP/2's `:authority`, else `Host`; letter case and port aside.
pub(super) fn allowed(req: &RequestHeader, hosts: &[Box<str>]) -> bool {
    if hosts.is_empty() {
        return true;
    }
    crate::host_name::named(req)
        .is_some_and(|name| hosts.iter().any(|h| h.eq_ignore_ascii_case(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_compared_without_its_port_and_case() {
        let hosts: Vec<Box<str>> = vec!["api.example.com".into(), "[::1]".into()];
        let with_host = |host: &str| {
            let mut req = RequestHeader::build("GET", b"/api/v1/x", None).unwrap();
            req.insert_header("host", host).unwrap();
            allowed(&req, &hosts)
        };
        assert!(with_host("api.example.com"));
        assert!(with_host("API.Example.COM:8443"));
        assert!(with_host("[::1]:8080"));
        assert!(!with_host("api.example.com."));
        assert!(!with_host("evil.example"));
        assert!(!with_host("api.example.com.evil.example"));
        assert!(!with_host(""));
        assert!(!with_host("[::2]"));
        assert!(with_host("api.example.com:"));
        for odd in [
            "api.example.com:evil.example",
            "api.example.com:/x",
            "api.example.com:80:80",
            "[::1]x",
            "[::1]:8o",
        ] {
            assert!(!with_host(odd), "{odd}");
        }
        let bare = RequestHeader::build("GET", b"/api/v1/x", None).unwrap();
        assert!(!allowed(&bare, &hosts), "no Host at all");
        assert!(allowed(&bare, &[]), "no list: any");
        let mut absolute = RequestHeader::build("GET", b"/api/v1/x", None).unwrap();
        absolute.set_uri(http::Uri::from_static("http://api.example.com:80/api/v1/x"));
        assert!(allowed(&absolute, &hosts));
        absolute.set_uri(http::Uri::from_static("http://evil.example/api/v1/x"));
        assert!(!allowed(&absolute, &hosts));
        // The authority's port is held to digits as `Host`'s is (HTTP/2's `:authority` too).
        for odd in [
            "http://api.example.com:evil.example/api/v1/x",
            "http://api.example.com:';x;'/api/v1/x",
            "http://user@api.example.com/api/v1/x",
        ] {
            absolute.set_uri(http::Uri::from_static(odd));
            assert!(!allowed(&absolute, &hosts), "{odd}");
        }
    }
}
