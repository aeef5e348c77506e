//! `redis+sentinel://` URLs: the sentinels, the monitored primary's name, credentials and
//! database. Parsed here so that `check` reports a bad one; the store connects with it.

/// What a `redis+sentinel://` URL says.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `host:port` of each sentinel.
    pub sentinels: Vec<String>,
    /// The monitored primary's name (`SENTINEL get-master-addr-by-name`).
    pub master: String,
    /// Credentials and database for the primary (the URL's user info and path).
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
    /// Credentials for the sentinels themselves (`?sentinel_username=…&sentinel_password=…`).
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

fn decoded(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| "credentials that are not UTF-8 once decoded".to_owned())
}

/// Parses `redis+sentinel://[[user]:password@]host:port[,host:port…]/master[/db][?sentinel_password=…]`;
/// `None` for any other scheme.
pub fn parse_sentinel_url(url: &str) -> Option<Result<SentinelUrl, String>> {
    let rest = url.strip_prefix("redis+sentinel://")?;
    Some(parse_rest(rest))
}

fn parse_rest(rest: &str) -> Result<SentinelUrl, String> {
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (Some(auth), rest),
        None => (None, rest),
    };
    let (hosts, path) = rest
        .split_once('/')
        .ok_or("a sentinel URL names the primary: redis+sentinel://host:26379,…/mymaster")?;
    let sentinels: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect();
    if sentinels.is_empty() {
        return Err("a sentinel URL lists at least one sentinel host:port".into());
    }
    // Positions, not values: a malformed URL may have put part of a password there.
    if let Some(n) = sentinels.iter().position(|h| {
        h.rsplit_once(':')
            .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    }) {
        return Err(format!(
            "sentinel {} of {} is not host:port",
            n + 1,
            sentinels.len()
        ));
    }
    let mut parts = path.split('/');
    let master = parts.next().unwrap_or_default().to_owned();
    if master.is_empty() {
        return Err(
            "a sentinel URL names the primary: redis+sentinel://host:26379,…/mymaster".into(),
        );
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse()
            .map_err(|_| format!("database \"{db}\" is not a number"))?,
    };
    if parts.next().is_some() {
        return Err("a sentinel URL's path is /master or /master/db".into());
    }
    let (username, password) = match auth {
        None => (None, None),
        Some(auth) => {
            let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
            let nonempty = |s: &str| (!s.is_empty()).then(|| decoded(s)).transpose();
            (nonempty(user)?, nonempty(pass)?)
        }
    };
    let (mut sentinel_username, mut sentinel_password) = (None, None);
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "sentinel_username" => sentinel_username = Some(value.into_owned()),
            "sentinel_password" => sentinel_password = Some(value.into_owned()),
            // Not echoed: an unencoded '&' in a password makes its tail look like a name.
            _ => {
                return Err("unknown sentinel URL parameter (sentinel_username and \
                            sentinel_password are known; percent-encode '&' and '=' in values)"
                    .into())
            }
        }
    }
    Ok(SentinelUrl {
        sentinels,
        master,
        username,
        password,
        db,
        sentinel_username,
        sentinel_password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_sentinels_primary_credentials_and_database() {
        let u = parse_sentinel_url(
            "redis+sentinel://:s%40cret@10.0.0.1:26379, 10.0.0.2:26380/mymaster/2",
        )
        .unwrap()
        .unwrap();
        assert_eq!(u.sentinels, ["10.0.0.1:26379", "10.0.0.2:26380"]);
        assert_eq!(u.master, "mymaster");
        assert_eq!(
            (u.username, u.password.as_deref(), u.db),
            (None, Some("s@cret"), 2)
        );
        let u = parse_sentinel_url("redis+sentinel://app:pw@h:1/m?sentinel_password=sp")
            .unwrap()
            .unwrap();
        assert_eq!(u.username.as_deref(), Some("app"));
        assert_eq!(u.sentinel_password.as_deref(), Some("sp"));
        assert_eq!(u.db, 0);
        assert!(parse_sentinel_url("redis://h:1").is_none());
        for (bad, why) in [
            ("redis+sentinel://h:1", "names the primary"),
            ("redis+sentinel://h:1/", "names the primary"),
            ("redis+sentinel:///m", "at least one sentinel"),
            ("redis+sentinel://h/m", "sentinel 1 of 1 is not host:port"),
            ("redis+sentinel://h:1/m/x", "is not a number"),
            ("redis+sentinel://h:1/m/0/9", "/master or /master/db"),
            (
                "redis+sentinel://h:1/m?timeout=1",
                "unknown sentinel URL parameter",
            ),
        ] {
            let err = parse_sentinel_url(bad).unwrap().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn credentials_stay_out_of_debug_output() {
        let u =
            parse_sentinel_url("redis+sentinel://:topsecret@h:1/m?sentinel_password=alsosecret")
                .unwrap()
                .unwrap();
        let shown = format!("{u:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
