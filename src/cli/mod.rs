//! `concord` subcommands other than serving (serving takes etcd's flags directly).

pub mod bench;
pub mod bench_log;
pub mod bench_queue;
pub mod bench_streams;
pub mod blob;
pub mod group;
pub mod health;
pub mod nodes;
pub mod queue;
pub mod snapshot;
pub mod status;

/// The (year, month, day) of a day count since 1970-01-01, proleptic Gregorian
/// (Howard Hinnant's civil_from_days), for the CLI's UTC timestamps.
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
