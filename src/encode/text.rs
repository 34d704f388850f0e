//! BigQuery's text rendering of scalar values, shared by the CSV and NDJSON encoders.
//!
//! Each rule, with the public evidence behind it (the research notes in
//! `../shared/reference/bigquery-export-text.md` collect the sources and their confidence):
//!
//! | type | text | source |
//! |---|---|---|
//! | BOOL | `true` / `false` | ZetaSQL `NumericToString(bool)` (google/zetasql `public/functions/convert_string.cc`); CAST docs |
//! | INT64 | plain decimal | ZetaSQL `NumericToString(int64_t)`; java-bigquery `ITBigQueryTest.testExtractJob` |
//! | FLOAT64 | shortest round-trip digits in `%g` layout (`0.1`, `25`, `1e-07`, `1e+20`); `NaN`, `Infinity`, `-Infinity` | layout of ZetaSQL `RoundTripDoubleToString` (`zetasql/base/string_numbers.cc`, BigQuery's CAST to STRING); integral values print without `.0` as the JSON export does (sonots, Qiita 2016). Non-finite spellings are the REST API's (google-cloud-go#2408, google-cloud-ruby#3488). Unconfirmed against a raw export. |
//! | NUMERIC, BIGNUMERIC | plain decimal, no exponent, trailing fractional zeros removed (`1.5`, `10`) | ZetaSQL `NumericValue::ToString` (`1.5`, not `1.500000000`) |
//! | DATE | `YYYY-MM-DD` | apache/beam `bigquery_read_it_test.py` (real export), bigframes `test_to_csv_index` |
//! | TIME | `HH:MM:SS[.f]` | beam `BigQueryAvroUtils.formatTime` ("matching the format used by JSON export") |
//! | DATETIME | `YYYY-MM-DDTHH:MM:SS[.f]` (`T` separator) | beam `bigquery_read_it_test.py` expects `2018-12-31T12:44:31` back from a real JSON export |
//! | TIMESTAMP | `YYYY-MM-DD HH:MM:SS[.f] UTC` | bigquery-schema-generator#19 (`bq extract` verified), google-cloud-php#3422 |
//! | BYTES | base64 (standard alphabet, padded) | BigQuery legacy data-types docs: "BYTES … are base64-encoded, unless you export to Avro" |
//!
//! **Fractional seconds** (`[.f]`): no fraction when it is zero, otherwise the fraction with its
//! trailing zeros removed (`02.1`, `02.123456`). Evidence: shun0102/embulk-parser-jsonl#7
//! (sonots, 2016) shows a real JSON export writing `2015-05-20 21:34:02 UTC`, `…02.1 UTC` and
//! `…02.123456 UTC`, and Beam's BigQueryAvroUtils before apache/beam#8046 trimmed zeros "to
//! match the JSON files exported by BigQuery". Later Beam code pads to six digits without
//! citing an export, so this is the best-supported reading, not a certainty: the rule lives in
//! [`write_fraction`] alone, so it is one place to change.
//!
//! Everything here appends to a `Vec<u8>` and allocates nothing per value: these functions run
//! once per cell on every exported row.

use base64::Engine;

/// Writes `n` as exactly `width` digits, zero-padded (n < 10^width).
#[inline]
fn push_padded(out: &mut Vec<u8>, mut n: u32, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for i in (0..width).rev() {
        out[start + i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
///
/// Howard Hinnant's `civil_from_days` ("chrono-Compatible Low-Level Date Algorithms"): exact for
/// every i32 day count, no tables, no branches on month lengths.
#[inline]
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe as i64 + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DD`. Years outside 0..=9999 (not representable in BigQuery) print with a sign.
#[inline]
pub fn write_date(out: &mut Vec<u8>, days: i64) {
    let (y, m, d) = civil_from_days(days);
    if (0..=9999).contains(&y) {
        push_padded(out, y as u32, 4);
    } else {
        out.extend_from_slice(itoa::Buffer::new().format(y).as_bytes());
    }
    out.push(b'-');
    push_padded(out, m, 2);
    out.push(b'-');
    push_padded(out, d, 2);
}

/// `.f` with trailing zeros removed, or nothing for a zero fraction. `digits` is the unit's
/// precision (6 for µs, 9 for ns). See the module docs for the evidence.
#[inline]
pub fn write_fraction(out: &mut Vec<u8>, mut frac: u32, mut digits: usize) {
    if frac == 0 {
        return;
    }
    while frac.is_multiple_of(10) {
        frac /= 10;
        digits -= 1;
    }
    out.push(b'.');
    push_padded(out, frac, digits);
}

/// `HH:MM:SS[.f]` for a time of day given as whole seconds plus a sub-second part.
#[inline]
pub fn write_time_of_day(out: &mut Vec<u8>, secs: u32, frac: u32, frac_digits: usize) {
    push_padded(out, secs / 3600, 2);
    out.push(b':');
    push_padded(out, secs / 60 % 60, 2);
    out.push(b':');
    push_padded(out, secs % 60, 2);
    write_fraction(out, frac, frac_digits);
}

/// Splits a count of `units_per_sec` since the epoch into (days, second of day, sub-second).
#[inline]
pub fn split_epoch(value: i64, units_per_sec: i64) -> (i64, u32, u32) {
    let secs = value.div_euclid(units_per_sec);
    let frac = value.rem_euclid(units_per_sec) as u32;
    (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32, frac)
}

/// DATETIME (`sep = b'T'`) or the date-and-time part of a TIMESTAMP (`sep = b' '`).
#[inline]
pub fn write_date_time(out: &mut Vec<u8>, value: i64, units_per_sec: i64, frac_digits: usize, sep: u8) {
    let (days, secs, frac) = split_epoch(value, units_per_sec);
    write_date(out, days);
    out.push(sep);
    write_time_of_day(out, secs, frac, frac_digits);
}

/// TIMESTAMP: `YYYY-MM-DD HH:MM:SS[.f] UTC`.
#[inline]
pub fn write_timestamp(out: &mut Vec<u8>, value: i64, units_per_sec: i64, frac_digits: usize) {
    write_date_time(out, value, units_per_sec, frac_digits, b' ');
    out.extend_from_slice(b" UTC");
}

/// Inserts a decimal point `scale` digits from the right of an integer's decimal digits and
/// drops trailing fractional zeros. `digits` may start with `-`.
pub fn write_decimal_digits(out: &mut Vec<u8>, digits: &[u8], scale: i8) {
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if scale <= 0 {
        if neg {
            out.push(b'-');
        }
        out.extend_from_slice(digits);
        if digits != b"0" {
            out.extend(std::iter::repeat_n(b'0', (-scale as i32) as usize));
        }
        return;
    }
    let scale = scale as usize;
    let (int_part, frac_part): (&[u8], &[u8]) =
        if digits.len() > scale { digits.split_at(digits.len() - scale) } else { (b"0", digits) };
    let frac_len = frac_part.iter().rposition(|&d| d != b'0').map_or(0, |p| p + 1);
    let is_zero = int_part == b"0" && frac_len == 0;
    if neg && !is_zero {
        out.push(b'-');
    }
    out.extend_from_slice(int_part);
    if frac_len > 0 {
        out.push(b'.');
        // Leading zeros of a short fraction: 1 at scale 9 is 0.000000001.
        out.extend(std::iter::repeat_n(b'0', scale - frac_part.len()));
        out.extend_from_slice(&frac_part[..frac_len]);
    }
}

#[inline]
pub fn write_decimal128(out: &mut Vec<u8>, value: i128, scale: i8) {
    write_decimal_digits(out, itoa::Buffer::new().format(value).as_bytes(), scale);
}

pub fn write_decimal256(out: &mut Vec<u8>, value: arrow_buffer::i256, scale: i8) {
    if let Some(v) = value.to_i128() {
        return write_decimal128(out, v, scale);
    }
    // Up to 77 digits: peel off two 38-digit groups with i256 division (each remainder fits an
    // i128), leaving a head of at most one digit; far cheaper than i256's Display.
    let p38 = arrow_buffer::i256::from_i128(10i128.pow(38));
    let mut digits = [0u8; 80];
    let mut len = 0;
    let mut push = |d: &[u8], len: &mut usize| {
        digits[*len..*len + d.len()].copy_from_slice(d);
        *len += d.len();
    };
    let (q1, r1) = value.wrapping_div_rem(p38);
    let (q2, r2) = q1.wrapping_div_rem(p38);
    if value.is_negative() {
        push(b"-", &mut len);
    }
    let lower = r1.to_i128().unwrap_or(0).unsigned_abs();
    let middle = r2.to_i128().unwrap_or(0).unsigned_abs();
    let head = q2.to_i128().unwrap_or(0).unsigned_abs();
    let mut buf = itoa::Buffer::new();
    if head > 0 {
        push(buf.format(head).as_bytes(), &mut len);
        push_group(&mut digits, &mut len, middle);
    } else {
        push(buf.format(middle).as_bytes(), &mut len);
    }
    push_group(&mut digits, &mut len, lower);
    write_decimal_digits(out, &digits[..len], scale);
}

/// Appends `v` as exactly 38 digits.
fn push_group(digits: &mut [u8; 80], len: &mut usize, v: u128) {
    let mut buf = itoa::Buffer::new();
    let s = buf.format(v).as_bytes();
    let pad = 38 - s.len();
    digits[*len..*len + pad].fill(b'0');
    digits[*len + pad..*len + 38].copy_from_slice(s);
    *len += 38;
}

/// A finite FLOAT64 as its shortest round-trip digits, laid out as C's `%g` lays them out.
/// Non-finite values are the caller's business (CSV and JSON spell them differently).
///
/// The digits are the shortest that parse back to the same double (ryu), as the issue and the
/// REST API's FLOAT64 strings ask. The layout is ZetaSQL's `RoundTripDoubleToString`
/// (`%.15g`, `%.17g` when 15 digits are not enough): plain notation for decimal exponents from
/// -4 up to the precision, else `d.ddde±XX`, and no trailing `.0` on integral values.
/// For values with at most 15 significant digits this is byte for byte what ZetaSQL prints.
pub fn write_f64(out: &mut Vec<u8>, v: f64) {
    debug_assert!(v.is_finite());
    let mut ryu_buf = ryu::Buffer::new();
    let text = ryu_buf.format_finite(v).as_bytes();
    // Split ryu's `-1.2345e-7` / `123.0` / `1e20` into significant digits and the decimal
    // exponent of the first digit, on the stack: this runs for every FLOAT64 cell.
    let text = text.strip_prefix(b"-").unwrap_or(text);
    let (mantissa, exp10) = match text.iter().position(|&b| b == b'e') {
        Some(i) => (&text[..i], parse_exponent(&text[i + 1..])),
        None => (text, 0),
    };
    let mut digits = [0u8; 24];
    let mut n = 0;
    let mut int_len = mantissa.len() as i32;
    for &b in mantissa {
        if b == b'.' {
            int_len = n as i32;
        } else if n < digits.len() {
            digits[n] = b;
            n += 1;
        }
    }
    let lead = digits[..n].iter().take_while(|&&d| d == b'0').count();
    let mut digits = &digits[lead..n];
    while let [rest @ .., b'0'] = digits {
        digits = rest;
    }
    if digits.is_empty() {
        out.extend_from_slice(if v.is_sign_negative() { b"-0" } else { b"0" });
        return;
    }
    let exp = int_len - lead as i32 + exp10 - 1;
    let precision = if digits.len() <= 15 { 15 } else { 17 };
    write_g(out, v.is_sign_negative(), digits, exp, precision);
}

fn parse_exponent(s: &[u8]) -> i32 {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    let e = digits.iter().fold(0i32, |acc, &d| acc * 10 + (d - b'0') as i32);
    if neg { -e } else { e }
}

/// C's `%.{precision}g` for a value already rounded to `digits` (no trailing zeros).
fn write_g(out: &mut Vec<u8>, negative: bool, digits: &[u8], exp: i32, precision: i32) {
    if negative {
        out.push(b'-');
    }
    if exp < -4 || exp >= precision {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let e = exp.unsigned_abs();
        if e < 10 {
            out.push(b'0');
        }
        out.extend_from_slice(itoa::Buffer::new().format(e).as_bytes());
    } else if exp < 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', (-exp - 1) as usize));
        out.extend_from_slice(digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.extend_from_slice(digits);
            out.extend(std::iter::repeat_n(b'0', int_len - digits.len()));
        } else {
            out.extend_from_slice(&digits[..int_len]);
            out.push(b'.');
            out.extend_from_slice(&digits[int_len..]);
        }
    }
}

/// Standard, padded base64 (RFC 4648 §4), appended in place.
#[inline]
pub fn write_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    out.resize(start + base64::encoded_len(bytes.len(), true).unwrap_or(0), 0);
    let written = base64::engine::general_purpose::STANDARD.encode_slice(bytes, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut v = Vec::new();
        f(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn dates_cover_bigquery_range() {
        assert_eq!(s(|o| write_date(o, 0)), "1970-01-01");
        assert_eq!(s(|o| write_date(o, -719_162)), "0001-01-01");
        assert_eq!(s(|o| write_date(o, 2_932_896)), "9999-12-31");
        assert_eq!(s(|o| write_date(o, 11_016)), "2000-02-29");
        assert_eq!(s(|o| write_date(o, -1)), "1969-12-31");
    }

    #[test]
    fn fractions_are_trimmed() {
        assert_eq!(s(|o| write_time_of_day(o, 0, 0, 6)), "00:00:00");
        assert_eq!(s(|o| write_time_of_day(o, 86_399, 999_999, 6)), "23:59:59.999999");
        assert_eq!(s(|o| write_time_of_day(o, 43_200, 100_000, 6)), "12:00:00.1");
        assert_eq!(s(|o| write_time_of_day(o, 1, 1_230, 6)), "00:00:01.00123");
        assert_eq!(s(|o| write_time_of_day(o, 1, 5, 9)), "00:00:01.000000005");
    }

    #[test]
    fn timestamps() {
        assert_eq!(s(|o| write_timestamp(o, 1_432_157_642_100_000, 1_000_000, 6)), "2015-05-20 21:34:02.1 UTC");
        assert_eq!(s(|o| write_timestamp(o, -62_135_596_800_000_000, 1_000_000, 6)), "0001-01-01 00:00:00 UTC");
        assert_eq!(s(|o| write_timestamp(o, 253_402_300_799_999_999, 1_000_000, 6)), "9999-12-31 23:59:59.999999 UTC");
        assert_eq!(s(|o| write_date_time(o, -1, 1_000_000, 6, b'T')), "1969-12-31T23:59:59.999999");
    }

    #[test]
    fn decimals() {
        assert_eq!(s(|o| write_decimal128(o, 1_500_000_000, 9)), "1.5");
        assert_eq!(s(|o| write_decimal128(o, 10_000_000_000, 9)), "10");
        assert_eq!(s(|o| write_decimal128(o, 0, 9)), "0");
        assert_eq!(s(|o| write_decimal128(o, 1, 9)), "0.000000001");
        assert_eq!(s(|o| write_decimal128(o, -1_230_000_000, 9)), "-1.23");
        assert_eq!(s(|o| write_decimal128(o, -5, 2)), "-0.05");
        assert_eq!(s(|o| write_decimal128(o, 12, -2)), "1200");
        assert_eq!(
            s(|o| write_decimal128(o, crate::read::synthetic::NUMERIC_MAX, 9)),
            "99999999999999999999999999999.999999999"
        );
        assert_eq!(
            s(|o| write_decimal256(o, arrow_buffer::i256::MAX, 38)),
            "578960446186580977117854925043439539266.34992332820282019728792003956564819967"
        );
        assert_eq!(s(|o| write_decimal256(o, arrow_buffer::i256::ONE, 38)), "0.00000000000000000000000000000000000001");
        assert_eq!(
            s(|o| write_decimal256(o, arrow_buffer::i256::MIN, 38)),
            "-578960446186580977117854925043439539266.34992332820282019728792003956564819968"
        );
        // Every magnitude agrees with i256's own Display.
        let mut v = arrow_buffer::i256::from_i128(-7);
        for _ in 0..76 {
            let mut expected = Vec::new();
            write_decimal_digits(&mut expected, v.to_string().as_bytes(), 20);
            assert_eq!(s(|o| write_decimal256(o, v, 20)).into_bytes(), expected, "{v}");
            v = v.wrapping_mul(arrow_buffer::i256::from_i128(10)).wrapping_add(arrow_buffer::i256::from_i128(3));
        }
    }

    #[test]
    fn floats_follow_round_trip_g() {
        let f = |v: f64| s(|o| write_f64(o, v));
        assert_eq!(f(0.1), "0.1");
        assert_eq!(f(25.0), "25");
        assert_eq!(f(-0.0), "-0");
        assert_eq!(f(0.0), "0");
        assert_eq!(f(1e-7), "1e-07");
        assert_eq!(f(0.0001), "0.0001");
        assert_eq!(f(1e20), "1e+20");
        assert_eq!(f(123_456_789_012_345.0), "123456789012345");
        assert_eq!(f(1e15), "1e+15");
        assert_eq!(f(123_456_789_012_345_680_000.0), "1.2345678901234568e+20");
        assert_eq!(f(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(f(f64::MAX), "1.7976931348623157e+308");
        assert_eq!(f(5e-324), "5e-324");
        assert_eq!(f(-1234.5), "-1234.5");
        assert_eq!(f(1.0 / 3.0), "0.3333333333333333");
        assert_eq!(f(-1.5e-300), "-1.5e-300");
        assert_eq!(f(1234567890123456.8), "1234567890123456.8");
        // Everything printed must parse back to the same double.
        for v in [0.1, 1e-7, 1e20, 1.0 / 3.0, 5e-324, f64::MAX, 2.5e-5, 9007199254740993.0] {
            assert_eq!(f(v).parse::<f64>().unwrap(), v);
        }
    }

    #[test]
    fn base64_standard_padded() {
        assert_eq!(s(|o| write_base64(o, &[0xAB, 0xAC])), "q6w=");
        assert_eq!(s(|o| write_base64(o, b"")), "");
    }
}
