//! Catalog publication deadlines in working days (工作日).
//!
//! After a shared table changes, the department must bring its catalog
//! entry up to date and have it published within a number of working days
//! (2 in Zhoushan and Songjiang, 5 in Wenzhou, 15 in Leshan). Working days
//! are Monday to Friday in the deployment's time zone, minus the listed
//! public holidays (法定节假日), plus the listed make-up working days on
//! weekends (调休上班日), from a calendar file:
//!
//! ```toml
//! holidays = ["2026-10-01", "2026-10-02", "2026-10-05"]
//! workdays = ["2026-10-10"]
//! ```
//!
//! The deadline is the end of the N-th working day after the day of the
//! change (the day of the change does not count).

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use shuyuan_protocol::UnixMillis;
use shuyuan_protocol::time::{civil_from_days, days_from_civil};
use shuyuan_service::ConfigError;
use shuyuan_service::config::{parse_toml, read_config};

const DAY_MS: i64 = 86_400_000;

/// A calendar day, as days since 1970-01-01.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(pub i64);

impl Day {
    /// Day of the week, 0 = Sunday .. 6 = Saturday.
    pub fn weekday(self) -> i64 {
        (self.0 + 4).rem_euclid(7)
    }

    fn from_civil(y: i64, m: i64, d: i64) -> Day {
        Day(days_from_civil(y, m, d))
    }

    fn to_civil(self) -> (i64, i64, i64) {
        civil_from_days(self.0)
    }
}

impl FromStr for Day {
    type Err = String;
    fn from_str(s: &str) -> Result<Day, String> {
        let bad = || format!("{s:?} is not a date YYYY-MM-DD");
        let mut parts = s.trim().split('-');
        let mut next = || {
            parts
                .next()
                .and_then(|p| p.parse::<i64>().ok())
                .ok_or_else(bad)
        };
        let (y, m, d) = (next()?, next()?, next()?);
        if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
            return Err(bad());
        }
        let day = Day::from_civil(y, m, d);
        if day.to_civil() != (y, m, d) {
            return Err(bad());
        }
        Ok(day)
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.to_civil();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCalendar {
    #[serde(default)]
    holidays: Vec<String>,
    #[serde(default)]
    workdays: Vec<String>,
}

/// Which days are working days, in which time zone.
#[derive(Debug, Clone, Default)]
pub struct Calendar {
    holidays: BTreeSet<Day>,
    workdays: BTreeSet<Day>,
    /// Offset of local time from UTC.
    offset_ms: i64,
}

impl Calendar {
    /// Weekdays only, in a time zone `offset_minutes` east of UTC.
    pub fn weekdays(offset_minutes: i64) -> Calendar {
        Calendar {
            offset_ms: offset_minutes * 60_000,
            ..Calendar::default()
        }
    }

    /// Reads a calendar file (see the module documentation).
    pub fn load(path: &Path, offset_minutes: i64) -> Result<Calendar, ConfigError> {
        let text = read_config(path)?;
        let raw: RawCalendar = parse_toml(path, &text)?;
        let mut cal = Calendar::weekdays(offset_minutes);
        for (key, list, set) in [
            ("holidays", &raw.holidays, &mut cal.holidays),
            ("workdays", &raw.workdays, &mut cal.workdays),
        ] {
            for d in list {
                set.insert(
                    d.parse()
                        .map_err(|e: String| ConfigError::at(path, key, e))?,
                );
            }
        }
        Ok(cal)
    }

    pub fn with_days(mut self, holidays: &[Day], workdays: &[Day]) -> Calendar {
        self.holidays.extend(holidays);
        self.workdays.extend(workdays);
        self
    }

    pub fn is_working_day(&self, day: Day) -> bool {
        if self.workdays.contains(&day) {
            return true;
        }
        (1..=5).contains(&day.weekday()) && !self.holidays.contains(&day)
    }

    /// The local day of an instant.
    pub fn day_of(&self, t: UnixMillis) -> Day {
        Day((t.0 + self.offset_ms).div_euclid(DAY_MS))
    }

    /// The end of the `n`-th working day after the day of `changed`.
    pub fn deadline(&self, changed: UnixMillis, n: u32) -> UnixMillis {
        let mut day = self.day_of(changed);
        let mut counted = 0;
        while counted < n {
            day = Day(day.0 + 1);
            if self.is_working_day(day) {
                counted += 1;
            }
        }
        UnixMillis((day.0 + 1) * DAY_MS - self.offset_ms)
    }
}

/// Parses a UTC offset such as `+08:00` into minutes.
pub fn parse_offset(s: &str) -> Option<i64> {
    let s = s.trim();
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 14 && m < 60).then_some(sign * (h * 60 + m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(day: &str, hour: i64) -> UnixMillis {
        // A local (UTC+8) time on `day`.
        let d: Day = day.parse().unwrap();
        UnixMillis(d.0 * DAY_MS + hour * 3_600_000 - 8 * 3_600_000)
    }

    fn end_of(day: &str) -> UnixMillis {
        at(day, 24)
    }

    #[test]
    fn dates_and_weekdays() {
        let d: Day = "2026-11-21".parse().unwrap();
        assert_eq!(d.weekday(), 6, "2026-11-21 is a Saturday");
        assert_eq!(d.to_string(), "2026-11-21");
        assert_eq!("1970-01-01".parse::<Day>().unwrap(), Day(0));
        assert!("2026-02-30".parse::<Day>().is_err());
        assert!("2026-13-01".parse::<Day>().is_err());
        assert_eq!(parse_offset("+08:00"), Some(480));
        assert_eq!(parse_offset("-03:30"), Some(-210));
        assert_eq!(parse_offset("8"), None);
    }

    #[test]
    fn two_working_days_across_a_weekend() {
        let cal = Calendar::weekdays(480);
        // Thursday 2026-11-19 15:00 -> Friday, Monday -> end of Monday 23rd.
        assert_eq!(cal.deadline(at("2026-11-19", 15), 2), end_of("2026-11-23"));
        // A change on Saturday counts from Monday.
        assert_eq!(cal.deadline(at("2026-11-21", 10), 2), end_of("2026-11-24"));
        // 23:00 on Friday in UTC+8 is still Friday: one working day -> Monday.
        assert_eq!(cal.deadline(at("2026-11-20", 23), 1), end_of("2026-11-23"));
    }

    #[test]
    fn holidays_and_make_up_workdays() {
        // National Day week: Oct 1-7 off, Saturday Oct 10 worked instead.
        let holidays: Vec<Day> = (1..=7)
            .map(|d| format!("2026-10-{d:02}").parse().unwrap())
            .collect();
        let cal = Calendar::weekdays(480).with_days(&holidays, &["2026-10-10".parse().unwrap()]);
        // Changed on Wednesday Sep 30: the holiday week does not count;
        // Thursday Oct 8 and Friday Oct 9 are the two working days.
        assert_eq!(cal.deadline(at("2026-09-30", 9), 2), end_of("2026-10-09"));
        // Three working days: the make-up Saturday counts.
        assert_eq!(cal.deadline(at("2026-09-30", 9), 3), end_of("2026-10-10"));
        assert!(!cal.is_working_day("2026-10-05".parse().unwrap()));
        assert!(cal.is_working_day("2026-10-10".parse().unwrap()));
    }

    #[test]
    fn calendar_file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("holidays.toml");
        std::fs::write(&p, "holidays = [\"2026-10-01\", \"soon\"]\n").unwrap();
        let e = Calendar::load(&p, 480).unwrap_err().to_string();
        assert!(
            e.contains("holidays.toml: holidays: \"soon\" is not a date"),
            "{e}"
        );
        std::fs::write(
            &p,
            "holidays = [\"2026-10-01\"]\nworkdays = [\"2026-10-10\"]\n",
        )
        .unwrap();
        let cal = Calendar::load(&p, 480).unwrap();
        assert!(!cal.is_working_day("2026-10-01".parse().unwrap()));
    }
}
