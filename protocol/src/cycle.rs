//! Update cycles (更新周期): how often a resource must show it is alive.
//!
//! A resource declares the cycle of its catalog entry. When a cycle passes
//! with no change, the agent sends a signed zero-update (零更新) instead. Named
//! cycles follow the catalog guide; `Every` is an explicit period (used by
//! the demo and by tests, which cannot wait a day).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

const DAY: u64 = 86_400;

/// A resource's declared update cycle. Encoded as its text form
/// (`daily`, `30s`, ...) everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum UpdateCycle {
    /// 实时: changes flow as they happen; liveness is shown every
    /// [`UpdateCycle::REALTIME_HEARTBEAT`] when quiet.
    Realtime,
    Daily,
    Weekly,
    Monthly,
    Quarterly,
    HalfYearly,
    Yearly,
    /// 不定期: no fixed cycle; liveness is shown daily.
    Irregular,
    /// An explicit period.
    Every(Duration),
}

impl UpdateCycle {
    /// How often a quiet real-time resource reports a zero-update.
    pub const REALTIME_HEARTBEAT: Duration = Duration::from_secs(60);

    /// The longest a resource may stay silent before a zero-update is due.
    /// Calendar cycles use fixed lengths (a month is 30 days, a quarter 91,
    /// half a year 182, a year 365), so the rule is the same every period.
    pub fn period(self) -> Duration {
        match self {
            UpdateCycle::Realtime => Self::REALTIME_HEARTBEAT,
            UpdateCycle::Daily | UpdateCycle::Irregular => Duration::from_secs(DAY),
            UpdateCycle::Weekly => Duration::from_secs(7 * DAY),
            UpdateCycle::Monthly => Duration::from_secs(30 * DAY),
            UpdateCycle::Quarterly => Duration::from_secs(91 * DAY),
            UpdateCycle::HalfYearly => Duration::from_secs(182 * DAY),
            UpdateCycle::Yearly => Duration::from_secs(365 * DAY),
            UpdateCycle::Every(d) => d,
        }
    }

    /// The Chinese term used in catalogs.
    pub fn chinese(self) -> &'static str {
        match self {
            UpdateCycle::Realtime => "实时",
            UpdateCycle::Daily => "每日",
            UpdateCycle::Weekly => "每周",
            UpdateCycle::Monthly => "每月",
            UpdateCycle::Quarterly => "每季度",
            UpdateCycle::HalfYearly => "每半年",
            UpdateCycle::Yearly => "每年",
            UpdateCycle::Irregular => "不定期",
            UpdateCycle::Every(_) => "自定义",
        }
    }
}

/// An unrecognised cycle name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an update cycle: use realtime, daily, weekly, monthly, quarterly, half-yearly, yearly, irregular, or a duration such as \"30s\" or \"15min\""
)]
pub struct CycleError(pub String);

impl FromStr for UpdateCycle {
    type Err = CycleError;
    fn from_str(s: &str) -> Result<Self, CycleError> {
        let t = s.trim();
        Ok(match t.to_ascii_lowercase().as_str() {
            "realtime" | "real-time" | "实时" => UpdateCycle::Realtime,
            "daily" | "每日" | "每天" => UpdateCycle::Daily,
            "weekly" | "每周" => UpdateCycle::Weekly,
            "monthly" | "每月" => UpdateCycle::Monthly,
            "quarterly" | "每季度" => UpdateCycle::Quarterly,
            "half-yearly" | "halfyearly" | "每半年" => UpdateCycle::HalfYearly,
            "yearly" | "每年" => UpdateCycle::Yearly,
            "irregular" | "不定期" => UpdateCycle::Irregular,
            _ => match parse_duration(t) {
                Some(d) if !d.is_zero() => UpdateCycle::Every(d),
                _ => return Err(CycleError(t.to_string())),
            },
        })
    }
}

impl fmt::Display for UpdateCycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateCycle::Realtime => f.write_str("realtime"),
            UpdateCycle::Daily => f.write_str("daily"),
            UpdateCycle::Weekly => f.write_str("weekly"),
            UpdateCycle::Monthly => f.write_str("monthly"),
            UpdateCycle::Quarterly => f.write_str("quarterly"),
            UpdateCycle::HalfYearly => f.write_str("half-yearly"),
            UpdateCycle::Yearly => f.write_str("yearly"),
            UpdateCycle::Irregular => f.write_str("irregular"),
            UpdateCycle::Every(d) if d.subsec_millis() == 0 => write!(f, "{}s", d.as_secs()),
            UpdateCycle::Every(d) => write!(f, "{}ms", d.as_millis()),
        }
    }
}

impl TryFrom<String> for UpdateCycle {
    type Error = CycleError;
    fn try_from(s: String) -> Result<Self, CycleError> {
        s.parse()
    }
}

impl From<UpdateCycle> for String {
    fn from(c: UpdateCycle) -> String {
        c.to_string()
    }
}

/// Parses `90`, `90s`, `500ms`, `15min`, `2h`, `1d`, `1h30min`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let piece = match unit {
            "ms" => Duration::from_millis(n),
            "s" | "sec" | "secs" => Duration::from_secs(n),
            "m" | "min" | "mins" => Duration::from_secs(n.checked_mul(60)?),
            "h" | "hour" | "hours" => Duration::from_secs(n.checked_mul(3600)?),
            "d" | "day" | "days" => Duration::from_secs(n.checked_mul(DAY)?),
            _ => return None,
        };
        total = total.checked_add(piece)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_durations() {
        assert_eq!("daily".parse::<UpdateCycle>().unwrap(), UpdateCycle::Daily);
        assert_eq!(
            "每季度".parse::<UpdateCycle>().unwrap(),
            UpdateCycle::Quarterly
        );
        assert_eq!(
            "30s".parse::<UpdateCycle>().unwrap(),
            UpdateCycle::Every(Duration::from_secs(30))
        );
        assert_eq!(
            "1h30min".parse::<UpdateCycle>().unwrap().period(),
            Duration::from_secs(5400)
        );
        assert!("0s".parse::<UpdateCycle>().is_err());
        assert!("fortnightly".parse::<UpdateCycle>().is_err());
        assert!("5x".parse::<UpdateCycle>().is_err());
        assert_eq!(UpdateCycle::Yearly.period(), Duration::from_secs(365 * DAY));
        for c in [
            UpdateCycle::HalfYearly,
            UpdateCycle::Every(Duration::from_secs(30)),
            UpdateCycle::Every(Duration::from_millis(1500)),
        ] {
            assert_eq!(c.to_string().parse::<UpdateCycle>().unwrap(), c, "{c}");
        }
    }
}
