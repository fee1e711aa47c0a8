//! How sizes, times and tables look on the terminal.

use std::fmt::Write as _;

pub(crate) use sloth_engine::human_size;

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` in UTC, so that output does not depend on the
/// machine's time zone.
pub(crate) fn utc_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A plain-text table: each column padded to its width and separated by one space, a dash
/// line under the header. A value longer than its column is printed whole and pushes the rest
/// of its row right, so that `awk '{print $1}'` still sees every name intact. The last column
/// is not padded, so no line ends in spaces.
#[derive(Debug)]
pub(crate) struct Table {
    widths: Vec<usize>,
    lines: Vec<String>,
}

impl Table {
    /// A table with these (header, width) columns.
    pub(crate) fn new(columns: &[(&str, usize)]) -> Self {
        let widths: Vec<usize> = columns.iter().map(|c| c.1).collect();
        let mut table = Self {
            widths,
            lines: Vec::new(),
        };
        let header: Vec<&str> = columns.iter().map(|c| c.0).collect();
        table.row(&header);
        let dashes: Vec<String> = table.widths.iter().map(|w| "-".repeat(*w)).collect();
        table.lines.push(dashes.join(" "));
        table
    }

    /// Adds a row; `cells` has one value per column.
    pub(crate) fn row<S: AsRef<str>>(&mut self, cells: &[S]) {
        let mut line = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, (cell, width)) in cells.iter().zip(&self.widths).enumerate() {
            let cell = cell.as_ref();
            if i == last {
                line.push_str(cell);
            } else {
                // `{:<w$}` pads by characters, which is what a terminal shows for the names
                // this store accepts (no control characters).
                let _ = write!(line, "{cell:<width$} ");
            }
        }
        self.lines.push(line);
    }

    /// The header, the dash line and the rows, one per line.
    pub(crate) fn lines(&self) -> &[String] {
        &self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_look_like_the_spec() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(12), "12 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1000), "1.0 KB");
        assert_eq!(human_size(450_000), "450 KB");
        assert_eq!(human_size(2_500_000), "2.5 MB");
        assert_eq!(human_size(5_300_000), "5.3 MB");
        assert_eq!(human_size(45_200_000), "45.2 MB");
        assert_eq!(human_size(99_960), "100 KB");
        assert_eq!(human_size(999_499), "999 KB");
        assert_eq!(human_size(999_999), "1.0 MB");
        assert_eq!(human_size(1 << 30), "1.1 GB");
        assert_eq!(human_size(u64::MAX), "18.4 EB");
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(1_760_106_600), "2025-10-10 14:30:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(-1), "1969-12-31 23:59:59");
        assert_eq!(utc_time(4_102_444_799), "2099-12-31 23:59:59");
    }

    #[test]
    fn table_pads_all_but_the_last_column_and_never_truncates() {
        let mut t = Table::new(&[("Name", 6), ("Size", 4), ("Task", 4)]);
        t.row(&["a", "1 B", "x"]);
        t.row(&["a-long-name", "2 B", "y"]);
        assert_eq!(
            t.lines(),
            [
                "Name   Size Task",
                "------ ---- ----",
                "a      1 B  x",
                "a-long-name 2 B  y"
            ]
        );
    }
}
