//! Monthly quota periods in UTC, resetting at 00:00 on an account's anchor day.

const DAY: i64 = 86_400;

/// A quota period `[start_unix, end_unix)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start_unix: i64,
    pub end_unix: i64,
}

impl Period {
    /// Length of the period in seconds.
    pub fn seconds(&self) -> u64 {
        u64::try_from(self.end_unix.saturating_sub(self.start_unix)).unwrap_or(0)
    }

    /// Seconds until the period ends: at least 1 while `now_unix < end_unix`, 0 afterwards.
    pub fn seconds_left(&self, now_unix: i64) -> u64 {
        if now_unix < self.end_unix {
            u64::try_from(self.end_unix.saturating_sub(now_unix))
                .unwrap_or(u64::MAX)
                .max(1)
        } else {
            0
        }
    }

    /// The start date as `YYYY-MM-DD`, e.g. `2026-11-01`. Written digit by digit, not with
    /// `format!` or chrono: it runs for every authorized request, and `format!` cost ~1.3 k
    /// instructions there (property-tested against `format!`).
    pub fn id(&self) -> String {
        let (y, m, d) = civil_from_days(self.start_unix.div_euclid(DAY));
        match u32::try_from(y) {
            // On every request: written digit by digit, `format!` costs ten times as much.
            Ok(y) if y <= 9999 => {
                let digit = |n: u32| char::from(b'0' + (n % 10) as u8);
                [
                    digit(y / 1000),
                    digit(y / 100),
                    digit(y / 10),
                    digit(y),
                    '-',
                    digit(m / 10),
                    digit(m),
                    '-',
                    digit(d / 10),
                    digit(d),
                ]
                .into_iter()
                .collect()
            }
            _ => format!("{y:04}-{m:02}-{d:02}"),
        }
    }
}

/// The period containing `now_unix` for an account whose quota resets on `anchor_day`
/// (1..=31; 0 or more than 31 is treated as 1) of each month at 00:00 UTC.
/// In months shorter than `anchor_day` the reset happens on the month's last day.
pub fn period_at(now_unix: i64, anchor_day: u8) -> Period {
    let anchor = if (1..=31).contains(&anchor_day) {
        u32::from(anchor_day)
    } else {
        1
    };
    let reset_day = |y: i64, m: u32| days_from_civil(y, m, anchor.min(days_in_month(y, m)));
    let today = now_unix.div_euclid(DAY);
    let (y, m, _) = civil_from_days(today);
    let this_reset = reset_day(y, m);
    let (start, end) = if today >= this_reset {
        let (ny, nm) = next_month(y, m);
        (this_reset, reset_day(ny, nm))
    } else {
        let (py, pm) = prev_month(y, m);
        (reset_day(py, pm), this_reset)
    };
    Period {
        start_unix: start.saturating_mul(DAY),
        end_unix: end.saturating_mul(DAY),
    }
}

fn next_month(y: i64, m: u32) -> (i64, u32) {
    if m >= 12 {
        (y.saturating_add(1), 1)
    } else {
        (y, m + 1)
    }
}

fn prev_month(y: i64, m: u32) -> (i64, u32) {
    if m <= 1 {
        (y.saturating_sub(1), 12)
    } else {
        (y, m - 1)
    }
}

/// Days since 1970-01-01 of the proleptic Gregorian date `y-m-d` (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let m = i64::from(m);
    let y = if m <= 2 { y.saturating_sub(1) } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400); // [0, 399]
    let mp = if m > 2 { m - 3 } else { m + 9 }; // [0, 11]
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era.saturating_mul(146_097)
        .saturating_add(doe)
        .saturating_sub(719_468)
}

/// The proleptic Gregorian date `(year, month, day)` of `z` days since 1970-01-01
/// (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let y = era.saturating_mul(400).saturating_add(yoe);
    let y = if m <= 2 { y.saturating_add(1) } else { y };
    // Both values are small and positive by construction.
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// Number of days in month `m` (1..=12) of year `y`; 0 for a month outside 1..=12.
pub fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if y.rem_euclid(4) == 0 && (y.rem_euclid(100) != 0 || y.rem_euclid(400) == 0) => 29,
        2 => 28,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(y: i64, m: u32, d: u32, secs: i64) -> i64 {
        days_from_civil(y, m, d) * DAY + secs
    }

    fn period(start: (i64, u32, u32), end: (i64, u32, u32)) -> Period {
        Period {
            start_unix: at(start.0, start.1, start.2, 0),
            end_unix: at(end.0, end.1, end.2, 0),
        }
    }

    #[test]
    fn known_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2026, 11, 1) * DAY, 1_793_491_200);
        assert_eq!(days_from_civil(2200, 1, 1) * DAY, 7_258_118_400);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(days_in_month(2028, 2), 29);
        assert_eq!(days_in_month(2100, 2), 28);
        assert_eq!(days_in_month(2000, 2), 29);
        assert_eq!(days_in_month(2027, 13), 0);
    }

    #[test]
    fn anchor_1_in_november() {
        let p = period_at(at(2026, 11, 17, 12 * 3600), 1);
        assert_eq!(p, period((2026, 11, 1), (2026, 12, 1)));
        assert_eq!(p.start_unix, 1_793_491_200);
        assert_eq!(p.seconds(), 30 * 86_400);
        assert_eq!(p.id(), "2026-11-01");
        assert_eq!(p.seconds_left(p.end_unix - 1), 1);
        assert_eq!(p.seconds_left(p.end_unix), 0);
        assert_eq!(p.seconds_left(p.start_unix), 30 * 86_400);
    }

    #[test]
    fn december_rolls_into_january() {
        let p = period_at(at(2026, 12, 31, 86_399), 1);
        assert_eq!(p, period((2026, 12, 1), (2027, 1, 1)));
        let p = period_at(at(2027, 1, 3, 0), 5);
        assert_eq!(p, period((2026, 12, 5), (2027, 1, 5)));
        assert_eq!(p.id(), "2026-12-05");
        let p = period_at(at(2026, 12, 20, 0), 20);
        assert_eq!(p, period((2026, 12, 20), (2027, 1, 20)));
    }

    #[test]
    fn anchor_31_in_february() {
        // Leap year: the February reset falls on the 29th.
        let p = period_at(at(2028, 2, 15, 0), 31);
        assert_eq!(p, period((2028, 1, 31), (2028, 2, 29)));
        let p = period_at(at(2028, 3, 1, 0), 31);
        assert_eq!(p, period((2028, 2, 29), (2028, 3, 31)));
        assert_eq!(p.id(), "2028-02-29");
        // Non-leap year: the 28th.
        let p = period_at(at(2027, 2, 28, 0), 31);
        assert_eq!(p, period((2027, 2, 28), (2027, 3, 31)));
        let p = period_at(at(2027, 2, 27, 86_399), 31);
        assert_eq!(p, period((2027, 1, 31), (2027, 2, 28)));
        assert_eq!(p.seconds(), 28 * 86_400);
    }

    #[test]
    fn anchor_15_before_the_15th_starts_last_month() {
        let p = period_at(at(2026, 11, 10, 0), 15);
        assert_eq!(p, period((2026, 10, 15), (2026, 11, 15)));
        assert_eq!(p.id(), "2026-10-15");
    }

    #[test]
    fn boundary_second_belongs_to_new_period() {
        let old = period_at(at(2026, 11, 14, 86_399), 15);
        let new = period_at(old.end_unix, 15);
        assert_eq!(new.start_unix, old.end_unix);
        assert_eq!(new, period((2026, 11, 15), (2026, 12, 15)));
        assert_eq!(period_at(old.end_unix - 1, 15), old);
    }

    #[test]
    fn invalid_anchor_is_treated_as_1() {
        let now = at(2026, 11, 17, 0);
        assert_eq!(period_at(now, 0), period_at(now, 1));
        assert_eq!(period_at(now, 32), period_at(now, 1));
        assert_eq!(period_at(now, 255), period_at(now, 1));
    }

    #[test]
    fn extremes_do_not_panic() {
        let _ = period_at(i64::MAX, 31);
        let _ = period_at(i64::MIN, 31);
        let _ = days_from_civil(i64::MAX, 12, 31);
        let _ = days_from_civil(i64::MIN, 1, 1);
        let _ = civil_from_days(i64::MAX);
        let _ = civil_from_days(i64::MIN);
        let p = period_at(0, 1);
        assert_eq!(p.id(), "1970-01-01");
    }

    proptest! {
        #[test]
        fn period_contains_now_and_chains(now in 0i64..7_258_118_400, anchor in 1u8..=31) {
            let p = period_at(now, anchor);
            prop_assert!(p.start_unix <= now && now < p.end_unix, "{p:?} vs {now}");
            prop_assert!((28 * 86_400..=31 * 86_400).contains(&p.seconds()), "{p:?}");
            prop_assert_eq!(p.start_unix.rem_euclid(DAY), 0);
            prop_assert_eq!(period_at(p.end_unix, anchor).start_unix, p.end_unix);
            prop_assert_eq!(period_at(p.start_unix, anchor), p);
            prop_assert!(p.seconds_left(now) >= 1);
        }

        #[test]
        fn civil_roundtrip(y in -100_000i64..100_000, m in 1u32..=12, d in 1u32..=31) {
            let d = d.min(days_in_month(y, m));
            prop_assert_eq!(civil_from_days(days_from_civil(y, m, d)), (y, m, d));
        }

        #[test]
        fn days_roundtrip(z in -50_000_000i64..50_000_000) {
            let (y, m, d) = civil_from_days(z);
            prop_assert!((1..=days_in_month(y, m)).contains(&d));
            prop_assert_eq!(days_from_civil(y, m, d), z);
        }

        #[test]
        fn id_is_the_start_date_zero_padded(start_day in -800_000i64..3_000_000) {
            let p = Period { start_unix: start_day * DAY, end_unix: start_day * DAY + DAY };
            let (y, m, d) = civil_from_days(start_day);
            prop_assert_eq!(p.id(), format!("{y:04}-{m:02}-{d:02}"));
        }
    }
}
