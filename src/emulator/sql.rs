//! The emulator's small GoogleSQL subset: `row_restriction` filters and the
//! `SELECT <columns> FROM <table> [WHERE <filter>]` queries of query mode.
//!
//! Supported, with BigQuery's semantics: comparisons (`= != <> < <= > >=`), `AND`/`OR`/`NOT`
//! with three-valued logic, parentheses, `[NOT] IN (...)`, `[NOT] BETWEEN ... AND ...`,
//! `IS [NOT] NULL|TRUE|FALSE`, nested column paths (`record.a`, backticks), literals (integers,
//! decimals, floats, quoted strings, `TRUE`/`FALSE`/`NULL`), typed literals (`DATE '…'`,
//! `TIME`, `DATETIME`, `TIMESTAMP`, `NUMERIC`, `BIGNUMERIC`) and `CAST('…' AS TYPE)`. A string
//! literal compared with a DATE/TIME/DATETIME/TIMESTAMP column is coerced to that type, as
//! BigQuery does. Anything else (functions, arithmetic, LIKE, subqueries) is refused with a
//! message, which the gRPC layer sends as INVALID_ARGUMENT: an emulator that silently ignored a
//! filter would make tests pass that real BigQuery fails.
//!
//! Filters are type-checked against the schema before any row is read ("No matching signature
//! for operator = for argument types: INT64, STRING", BigQuery's wording), then evaluated row by
//! row into a selection mask. Speed is not the point here; exactness is.

use std::cmp::Ordering;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Decimal128Type, Decimal256Type, Float64Type, Int64Type, Time64MicrosecondType, TimestampMicrosecondType,
};
use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch};
use arrow_buffer::i256;
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use chrono::{NaiveDate, NaiveDateTime, NaiveTime};

// ---------------------------------------------------------------------------------------------
// Tokens

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A backtick-quoted identifier (never a keyword).
    Quoted(String),
    Number(String),
    Str(String),
    Sym(&'static str),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') || c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '-') {
                // `-` only inside project names such as my-project; `a-b` arithmetic is not supported anyway.
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                i += 1;
                if i < chars.len() && (chars[i] == '+' || chars[i] == '-') {
                    i += 1;
                }
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            out.push(Tok::Number(chars[start..i].iter().collect()));
        } else if c == '\'' || c == '"' {
            let quote = c;
            i += 1;
            let mut text = String::new();
            loop {
                let Some(&ch) = chars.get(i) else { return Err("unterminated string literal".into()) };
                i += 1;
                match ch {
                    '\\' => {
                        let Some(&esc) = chars.get(i) else { return Err("unterminated string literal".into()) };
                        i += 1;
                        text.push(match esc {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            '0' => '\0',
                            other => other,
                        });
                    }
                    ch if ch == quote => break,
                    ch => text.push(ch),
                }
            }
            out.push(Tok::Str(text));
        } else if c == '`' {
            i += 1;
            let start = i;
            while i < chars.len() && chars[i] != '`' {
                i += 1;
            }
            if i >= chars.len() {
                return Err("unterminated quoted identifier".into());
            }
            out.push(Tok::Quoted(chars[start..i].iter().collect()));
            i += 1;
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let sym = match two.as_str() {
                "!=" => Some("!="),
                "<>" => Some("!="),
                "<=" => Some("<="),
                ">=" => Some(">="),
                _ => None,
            };
            if let Some(sym) = sym {
                out.push(Tok::Sym(sym));
                i += 2;
                continue;
            }
            let sym = match c {
                '(' => "(",
                ')' => ")",
                ',' => ",",
                '.' => ".",
                '*' => "*",
                '=' => "=",
                '<' => "<",
                '>' => ">",
                '-' => "-",
                '+' => "+",
                ';' => ";",
                other => return Err(format!("Syntax error: Unexpected character \"{other}\"")),
            };
            out.push(Tok::Sym(sym));
            i += 1;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Syntax tree

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Lit {
    Null,
    Bool(bool),
    /// A number as written, typed when bound (INT64, NUMERIC or FLOAT64 by context).
    Number(String),
    Str(String),
    /// `DATE '…'` and friends: the type name and the text.
    Typed(String, String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Column(Vec<String>),
    Lit(Lit),
    Cmp(Box<Expr>, CmpOp, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    In { expr: Box<Expr>, list: Vec<Expr>, negated: bool },
    Between { expr: Box<Expr>, low: Box<Expr>, high: Box<Expr>, negated: bool },
    IsNull { expr: Box<Expr>, negated: bool },
    IsBool { expr: Box<Expr>, value: bool, negated: bool },
}

/// A parsed `SELECT`.
#[derive(Debug, Clone, PartialEq)]
pub struct Select {
    /// Empty means `*`.
    pub columns: Vec<String>,
    /// `project.dataset.table` or `dataset.table`, as written.
    pub table: Vec<String>,
    pub filter: Option<Expr>,
}

/// What a query text is.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    Select(Select),
    /// Several statements: BigQuery runs these as a script job without a destination table.
    Script {
        statements: usize,
    },
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

const RESERVED: &[&str] =
    &["AND", "OR", "NOT", "IN", "BETWEEN", "IS", "NULL", "TRUE", "FALSE", "SELECT", "FROM", "WHERE", "CAST", "AS"];

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn eat_keyword(&mut self, kw: &str) -> bool {
        let yes = self.keyword(kw);
        if yes {
            self.pos += 1;
        }
        yes
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        let yes = matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym);
        if yes {
            self.pos += 1;
        }
        yes
    }

    fn expect_sym(&mut self, sym: &str) -> Result<(), String> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            Err(format!("Syntax error: Expected \"{sym}\" but got {}", self.shown()))
        }
    }

    fn shown(&self) -> String {
        match self.peek() {
            None => "end of input".into(),
            Some(Tok::Ident(w)) => format!("keyword or identifier {w}"),
            Some(Tok::Quoted(w)) => format!("identifier `{w}`"),
            Some(Tok::Number(n)) => format!("number {n}"),
            Some(Tok::Str(s)) => format!("string literal '{s}'"),
            Some(Tok::Sym(s)) => format!("\"{s}\""),
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.eat_keyword("OR") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.not()?;
        while self.eat_keyword("AND") {
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if self.eat_keyword("NOT") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.predicate()
    }

    fn predicate(&mut self) -> Result<Expr, String> {
        let left = self.operand()?;
        let op = match self.peek() {
            Some(Tok::Sym("=")) => Some(CmpOp::Eq),
            Some(Tok::Sym("!=")) => Some(CmpOp::Ne),
            Some(Tok::Sym("<")) => Some(CmpOp::Lt),
            Some(Tok::Sym("<=")) => Some(CmpOp::Le),
            Some(Tok::Sym(">")) => Some(CmpOp::Gt),
            Some(Tok::Sym(">=")) => Some(CmpOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            self.pos += 1;
            let right = self.operand()?;
            return Ok(Expr::Cmp(Box::new(left), op, Box::new(right)));
        }
        if self.eat_keyword("IS") {
            let negated = self.eat_keyword("NOT");
            if self.eat_keyword("NULL") {
                return Ok(Expr::IsNull { expr: Box::new(left), negated });
            }
            for (kw, value) in [("TRUE", true), ("FALSE", false)] {
                if self.eat_keyword(kw) {
                    return Ok(Expr::IsBool { expr: Box::new(left), value, negated });
                }
            }
            return Err(format!("Syntax error: Expected NULL, TRUE or FALSE after IS but got {}", self.shown()));
        }
        let negated = self.keyword("NOT")
            && matches!(self.toks.get(self.pos + 1), Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("IN") || w.eq_ignore_ascii_case("BETWEEN"));
        if negated {
            self.pos += 1;
        }
        if self.eat_keyword("IN") {
            self.expect_sym("(")?;
            let mut list = vec![self.operand()?];
            while self.eat_sym(",") {
                list.push(self.operand()?);
            }
            self.expect_sym(")")?;
            return Ok(Expr::In { expr: Box::new(left), list, negated });
        }
        if self.eat_keyword("BETWEEN") {
            let low = self.operand()?;
            if !self.eat_keyword("AND") {
                return Err(format!("Syntax error: Expected AND in BETWEEN but got {}", self.shown()));
            }
            let high = self.operand()?;
            return Ok(Expr::Between { expr: Box::new(left), low: Box::new(low), high: Box::new(high), negated });
        }
        if negated {
            return Err("Syntax error: Expected IN or BETWEEN after NOT".into());
        }
        Ok(left)
    }

    fn operand(&mut self) -> Result<Expr, String> {
        if self.eat_sym("(") {
            let e = self.expr()?;
            self.expect_sym(")")?;
            return Ok(e);
        }
        if self.eat_sym("-") {
            return match self.toks.get(self.pos).cloned() {
                Some(Tok::Number(n)) => {
                    self.pos += 1;
                    Ok(Expr::Lit(Lit::Number(format!("-{n}"))))
                }
                _ => Err("Syntax error: only number literals can be negated here".into()),
            };
        }
        let tok = self.toks.get(self.pos).cloned().ok_or("Syntax error: Unexpected end of expression")?;
        self.pos += 1;
        match tok {
            Tok::Number(n) => Ok(Expr::Lit(Lit::Number(n))),
            Tok::Str(s) => Ok(Expr::Lit(Lit::Str(s))),
            Tok::Quoted(q) => {
                let mut path: Vec<String> = q.split('.').map(str::to_string).collect();
                self.more_path(&mut path)?;
                Ok(Expr::Column(path))
            }
            Tok::Ident(w) => {
                let upper = w.to_ascii_uppercase();
                match upper.as_str() {
                    "NULL" => return Ok(Expr::Lit(Lit::Null)),
                    "TRUE" => return Ok(Expr::Lit(Lit::Bool(true))),
                    "FALSE" => return Ok(Expr::Lit(Lit::Bool(false))),
                    "DATE" | "TIME" | "DATETIME" | "TIMESTAMP" | "NUMERIC" | "BIGNUMERIC" | "BIGDECIMAL"
                    | "DECIMAL"
                        if matches!(self.peek(), Some(Tok::Str(_))) =>
                    {
                        let Some(Tok::Str(text)) = self.toks.get(self.pos).cloned() else { unreachable!() };
                        self.pos += 1;
                        return Ok(Expr::Lit(Lit::Typed(canonical_type(&upper).to_string(), text)));
                    }
                    "CAST" if matches!(self.peek(), Some(Tok::Sym("("))) => {
                        self.pos += 1;
                        let inner = self.operand()?;
                        if !self.eat_keyword("AS") {
                            return Err(format!("Syntax error: Expected AS in CAST but got {}", self.shown()));
                        }
                        let Some(Tok::Ident(ty)) = self.toks.get(self.pos).cloned() else {
                            return Err("Syntax error: Expected a type name in CAST".into());
                        };
                        self.pos += 1;
                        self.expect_sym(")")?;
                        let ty = canonical_type(&ty.to_ascii_uppercase()).to_string();
                        return match inner {
                            Expr::Lit(Lit::Str(s)) | Expr::Lit(Lit::Number(s)) => Ok(Expr::Lit(Lit::Typed(ty, s))),
                            _ => Err("the emulator supports CAST of literals only".into()),
                        };
                    }
                    _ => {}
                }
                if matches!(self.peek(), Some(Tok::Sym("("))) {
                    return Err(format!("Function not found: {w} (the emulator supports no functions in filters)"));
                }
                if RESERVED.contains(&upper.as_str()) {
                    return Err(format!("Syntax error: Unexpected keyword {upper}"));
                }
                let mut path = vec![w];
                self.more_path(&mut path)?;
                Ok(Expr::Column(path))
            }
            Tok::Sym(s) => Err(format!("Syntax error: Unexpected \"{s}\"")),
        }
    }

    fn more_path(&mut self, path: &mut Vec<String>) -> Result<(), String> {
        while self.eat_sym(".") {
            match self.toks.get(self.pos).cloned() {
                Some(Tok::Ident(w)) | Some(Tok::Quoted(w)) => {
                    self.pos += 1;
                    path.push(w);
                }
                _ => return Err("Syntax error: Expected a field name after \".\"".into()),
            }
        }
        Ok(())
    }

    fn done(&self) -> Result<(), String> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(format!("Syntax error: Unexpected {}", self.shown())),
        }
    }
}

fn canonical_type(t: &str) -> &str {
    match t {
        "BIGDECIMAL" => "BIGNUMERIC",
        "DECIMAL" => "NUMERIC",
        "INTEGER" => "INT64",
        "FLOAT" => "FLOAT64",
        "BOOLEAN" => "BOOL",
        other => other,
    }
}

/// Parses a `row_restriction`.
pub fn parse_filter(text: &str) -> Result<Expr, String> {
    let mut p = Parser { toks: tokenize(text)?, pos: 0 };
    if p.toks.is_empty() {
        return Err("empty row restriction".into());
    }
    let e = p.expr()?;
    p.done()?;
    Ok(e)
}

/// Parses query text: one `SELECT cols FROM table [WHERE filter]`, or a multi-statement script.
pub fn parse_query(text: &str) -> Result<Statement, String> {
    let toks = tokenize(text)?;
    let statements = toks.split(|t| *t == Tok::Sym(";")).filter(|s| !s.is_empty()).count();
    if statements > 1 {
        return Ok(Statement::Script { statements });
    }
    let toks: Vec<Tok> = toks.into_iter().filter(|t| *t != Tok::Sym(";")).collect();
    let mut p = Parser { toks, pos: 0 };
    if !p.eat_keyword("SELECT") {
        return Err(format!(
            "the emulator runs `SELECT <columns> FROM <table> [WHERE <filter>]` only; got {}",
            p.shown()
        ));
    }
    let mut columns = Vec::new();
    if !p.eat_sym("*") {
        loop {
            match p.operand()? {
                Expr::Column(path) => columns.push(path.join(".")),
                other => return Err(format!("the emulator selects plain columns only, not {other:?}")),
            }
            if !p.eat_sym(",") {
                break;
            }
        }
    }
    if !p.eat_keyword("FROM") {
        return Err(format!("Syntax error: Expected FROM but got {}", p.shown()));
    }
    let mut table = Vec::new();
    loop {
        match p.toks.get(p.pos).cloned() {
            Some(Tok::Ident(w)) => table.push(w),
            Some(Tok::Quoted(q)) => table.extend(q.split('.').map(str::to_string)),
            _ => return Err(format!("Syntax error: Expected a table name but got {}", p.shown())),
        }
        p.pos += 1;
        if !p.eat_sym(".") {
            break;
        }
    }
    if !(2..=3).contains(&table.len()) {
        return Err(format!(
            "Table name \"{}\" missing dataset while no default dataset is set in the request",
            table.join(".")
        ));
    }
    let filter = if p.eat_keyword("WHERE") { Some(p.expr()?) } else { None };
    p.done()?;
    Ok(Statement::Select(Select { columns, table, filter }))
}

// ---------------------------------------------------------------------------------------------
// Types and values

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Null,
    Bool,
    Int,
    Float,
    Numeric,
    BigNumeric,
    Str,
    Bytes,
    Date,
    Time,
    Datetime,
    Timestamp,
    /// JSON, GEOGRAPHY, ARRAY, STRUCT: not comparable here.
    Other(&'static str),
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Null => "NULL",
            Ty::Bool => "BOOL",
            Ty::Int => "INT64",
            Ty::Float => "FLOAT64",
            Ty::Numeric => "NUMERIC",
            Ty::BigNumeric => "BIGNUMERIC",
            Ty::Str => "STRING",
            Ty::Bytes => "BYTES",
            Ty::Date => "DATE",
            Ty::Time => "TIME",
            Ty::Datetime => "DATETIME",
            Ty::Timestamp => "TIMESTAMP",
            Ty::Other(n) => n,
        }
    }

    fn numeric(self) -> bool {
        matches!(self, Ty::Int | Ty::Float | Ty::Numeric | Ty::BigNumeric)
    }

    fn of(field: &Field) -> Ty {
        let tag = field.metadata().get("ARROW:extension:name").map(String::as_str).unwrap_or_default();
        match field.data_type() {
            DataType::Boolean => Ty::Bool,
            DataType::Int64 => Ty::Int,
            DataType::Float64 => Ty::Float,
            DataType::Decimal128(..) => Ty::Numeric,
            DataType::Decimal256(..) => Ty::BigNumeric,
            DataType::Utf8 if tag.ends_with("geography") => Ty::Other("GEOGRAPHY"),
            DataType::Utf8 if tag.ends_with("json") => Ty::Other("JSON"),
            DataType::Utf8 => Ty::Str,
            DataType::Binary => Ty::Bytes,
            DataType::Date32 => Ty::Date,
            DataType::Time64(TimeUnit::Microsecond) => Ty::Time,
            DataType::Timestamp(TimeUnit::Microsecond, None) => Ty::Datetime,
            DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => Ty::Timestamp,
            DataType::List(_) => Ty::Other("ARRAY"),
            DataType::Struct(_) => Ty::Other("STRUCT"),
            _ => Ty::Other("UNSUPPORTED"),
        }
    }
}

/// One value during evaluation. Decimals are scaled to 38 digits so NUMERIC, BIGNUMERIC and
/// INT64 compare exactly.
#[derive(Debug, Clone, PartialEq)]
enum Val<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Dec(i256),
    Str(&'a str),
    Bytes(&'a [u8]),
    Date(i32),
    Time(i64),
    Datetime(i64),
    Timestamp(i64),
}

fn pow10(n: u32) -> i256 {
    i256::from_i128(10).wrapping_pow(n)
}

/// Parses `-12.345` exactly into a value scaled by 10^38.
fn parse_decimal(text: &str) -> Option<i256> {
    let t = text.trim();
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    if (int.is_empty() && frac.is_empty()) || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 38 || int.len() > 39 {
        return None;
    }
    let int_v = if int.is_empty() { i256::ZERO } else { i256::from_string(int)? };
    let frac_v = if frac.is_empty() {
        i256::ZERO
    } else {
        i256::from_string(frac)?.checked_mul(pow10(38 - frac.len() as u32))?
    };
    let v = int_v.checked_mul(pow10(38))?.checked_add(frac_v)?;
    Some(if neg { v.wrapping_neg() } else { v })
}

fn parse_date(s: &str) -> Option<i32> {
    let d = NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").ok()?;
    Some((d - NaiveDate::from_ymd_opt(1970, 1, 1)?).num_days() as i32)
}

fn parse_time(s: &str) -> Option<i64> {
    let t = NaiveTime::parse_from_str(s.trim(), "%H:%M:%S%.f")
        .or_else(|_| NaiveTime::parse_from_str(s.trim(), "%H:%M"))
        .ok()?;
    t.signed_duration_since(NaiveTime::MIN).num_microseconds()
}

fn parse_datetime(s: &str) -> Option<i64> {
    let s = s.trim();
    let dt = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f"))
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M"))
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M"))
        .ok()
        .or_else(|| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok().and_then(|d| d.and_hms_opt(0, 0, 0)))?;
    Some(dt.and_utc().timestamp_micros())
}

/// `YYYY-MM-DD[ HH:MM:SS[.ffffff]][Z| UTC|+HH[:MM]]`; no zone means UTC (BigQuery's default).
fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let (body, offset_secs) = if let Some(b) = s.strip_suffix(" UTC").or_else(|| s.strip_suffix("UTC")) {
        (b.trim_end(), 0)
    } else if let Some(b) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        (b, 0)
    } else {
        // A trailing +HH[:MM] / -HH[:MM] after the time part.
        let tail_start = s.rfind(['+', '-']).filter(|&i| i > 10);
        match tail_start {
            Some(i) => {
                let (b, tz) = s.split_at(i);
                let sign = if tz.starts_with('-') { -1 } else { 1 };
                let digits = &tz[1..];
                let (h, m) = digits.split_once(':').unwrap_or((digits, "0"));
                let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
                (b.trim_end(), sign * (h * 3600 + m * 60))
            }
            None => (s, 0),
        }
    };
    Some(parse_datetime(body)? - offset_secs * 1_000_000)
}

/// A bound expression: columns resolved, literals typed.
#[derive(Debug, Clone)]
enum Bound {
    Column { path: Vec<usize>, ty: Ty },
    Const(Const),
    Cmp(Box<Bound>, CmpOp, Box<Bound>),
    And(Box<Bound>, Box<Bound>),
    Or(Box<Bound>, Box<Bound>),
    Not(Box<Bound>),
    In { expr: Box<Bound>, list: Vec<Bound>, negated: bool },
    IsNull { expr: Box<Bound>, negated: bool },
    IsBool { expr: Box<Bound>, value: bool, negated: bool },
}

#[derive(Debug, Clone, PartialEq)]
enum Const {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Dec(i256),
    Str(String),
    Date(i32),
    Time(i64),
    Datetime(i64),
    Timestamp(i64),
}

impl Const {
    fn val(&self) -> Val<'_> {
        match self {
            Const::Null => Val::Null,
            Const::Bool(b) => Val::Bool(*b),
            Const::Int(i) => Val::Int(*i),
            Const::Float(f) => Val::Float(*f),
            Const::Dec(d) => Val::Dec(*d),
            Const::Str(s) => Val::Str(s),
            Const::Date(d) => Val::Date(*d),
            Const::Time(t) => Val::Time(*t),
            Const::Datetime(t) => Val::Datetime(*t),
            Const::Timestamp(t) => Val::Timestamp(*t),
        }
    }

    fn ty(&self) -> Ty {
        match self {
            Const::Null => Ty::Null,
            Const::Bool(_) => Ty::Bool,
            Const::Int(_) => Ty::Int,
            Const::Float(_) => Ty::Float,
            Const::Dec(_) => Ty::Numeric,
            Const::Str(_) => Ty::Str,
            Const::Date(_) => Ty::Date,
            Const::Time(_) => Ty::Time,
            Const::Datetime(_) => Ty::Datetime,
            Const::Timestamp(_) => Ty::Timestamp,
        }
    }
}

/// A filter checked against a schema, ready to evaluate.
#[derive(Debug, Clone)]
pub struct Filter {
    bound: Bound,
}

fn resolve(schema: &Schema, path: &[String]) -> Result<(Vec<usize>, Ty), String> {
    let unrecognized = || format!("Unrecognized name: {}", path.join("."));
    let (first, rest) = path.split_first().ok_or_else(unrecognized)?;
    let (mut idx, mut field) = schema
        .fields()
        .iter()
        .enumerate()
        .find(|(_, f)| f.name().eq_ignore_ascii_case(first))
        .map(|(i, f)| (vec![i], f.clone()))
        .ok_or_else(unrecognized)?;
    for name in rest {
        let DataType::Struct(children) = field.data_type() else {
            return Err(format!("Cannot access field {name} on a value with type {}", Ty::of(&field).name()));
        };
        let (i, child) = children
            .iter()
            .enumerate()
            .find(|(_, c)| c.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("Field name {name} does not exist in STRUCT {}", field.name()))?;
        idx.push(i);
        field = child.clone();
    }
    Ok((idx, Ty::of(&field)))
}

fn literal(lit: &Lit, want: Option<Ty>) -> Result<Const, String> {
    let bad_literal = |ty: &str, text: &str| format!("Could not cast literal \"{text}\" to type {ty}");
    Ok(match lit {
        Lit::Null => Const::Null,
        Lit::Bool(b) => Const::Bool(*b),
        Lit::Number(n) => {
            let is_int = !n.contains(['.', 'e', 'E']);
            match want {
                Some(Ty::Numeric | Ty::BigNumeric) if !n.contains(['e', 'E']) => {
                    Const::Dec(parse_decimal(n).ok_or_else(|| format!("Invalid NUMERIC literal {n}"))?)
                }
                Some(Ty::Float) => Const::Float(n.parse().map_err(|_| format!("Invalid FLOAT64 literal {n}"))?),
                _ if is_int => match n.parse::<i64>() {
                    Ok(i) => Const::Int(i),
                    Err(_) => return Err(format!("Invalid integer literal: {n}")),
                },
                _ => Const::Float(n.parse().map_err(|_| format!("Invalid floating point literal: {n}"))?),
            }
        }
        Lit::Str(s) => match want {
            Some(Ty::Date) => Const::Date(parse_date(s).ok_or_else(|| bad_literal("DATE", s))?),
            Some(Ty::Time) => Const::Time(parse_time(s).ok_or_else(|| bad_literal("TIME", s))?),
            Some(Ty::Datetime) => Const::Datetime(parse_datetime(s).ok_or_else(|| bad_literal("DATETIME", s))?),
            Some(Ty::Timestamp) => Const::Timestamp(parse_timestamp(s).ok_or_else(|| bad_literal("TIMESTAMP", s))?),
            _ => Const::Str(s.clone()),
        },
        Lit::Typed(ty, text) => match ty.as_str() {
            "DATE" => Const::Date(parse_date(text).ok_or_else(|| bad_literal("DATE", text))?),
            "TIME" => Const::Time(parse_time(text).ok_or_else(|| bad_literal("TIME", text))?),
            "DATETIME" => Const::Datetime(parse_datetime(text).ok_or_else(|| bad_literal("DATETIME", text))?),
            "TIMESTAMP" => Const::Timestamp(parse_timestamp(text).ok_or_else(|| bad_literal("TIMESTAMP", text))?),
            "NUMERIC" | "BIGNUMERIC" => Const::Dec(parse_decimal(text).ok_or_else(|| bad_literal(ty, text))?),
            "INT64" => Const::Int(text.trim().parse().map_err(|_| bad_literal("INT64", text))?),
            "FLOAT64" => Const::Float(text.trim().parse().map_err(|_| bad_literal("FLOAT64", text))?),
            "STRING" => Const::Str(text.clone()),
            "BOOL" => match text.trim().to_ascii_lowercase().as_str() {
                "true" => Const::Bool(true),
                "false" => Const::Bool(false),
                _ => return Err(bad_literal("BOOL", text)),
            },
            other => return Err(format!("the emulator does not support {other} literals")),
        },
    })
}

fn comparable(a: Ty, b: Ty) -> bool {
    a == Ty::Null || b == Ty::Null || (a.numeric() && b.numeric()) || (a == b && !matches!(a, Ty::Other(_)))
}

impl Filter {
    pub fn bind(expr: &Expr, schema: &Schema) -> Result<Filter, String> {
        let bound = bind(expr, schema)?;
        match ty_of(&bound) {
            Ty::Bool | Ty::Null => Ok(Filter { bound }),
            other => Err(format!("WHERE clause should return type BOOL, but returns {}", other.name())),
        }
    }

    /// The rows of `batch` for which the filter is TRUE.
    pub fn mask(&self, batch: &RecordBatch) -> BooleanArray {
        let columns = batch.columns();
        (0..batch.num_rows()).map(|row| Some(eval(&self.bound, columns, row) == Val::Bool(true))).collect()
    }

    pub fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch, String> {
        arrow_select::filter::filter_record_batch(batch, &self.mask(batch)).map_err(|e| e.to_string())
    }
}

fn ty_of(b: &Bound) -> Ty {
    match b {
        Bound::Column { ty, .. } => *ty,
        Bound::Const(c) => c.ty(),
        _ => Ty::Bool,
    }
}

/// Binds one side of a comparison given the other side's type (for literal coercion).
fn bind_operand(e: &Expr, other: &Expr, schema: &Schema) -> Result<Bound, String> {
    match (e, other) {
        (Expr::Lit(lit), Expr::Column(path)) => {
            let (_, ty) = resolve(schema, path)?;
            Ok(Bound::Const(literal(lit, Some(ty))?))
        }
        _ => bind(e, schema),
    }
}

fn bind_comparison(left: &Expr, right: &Expr, schema: &Schema, op: &str) -> Result<(Bound, Bound), String> {
    let l = bind_operand(left, right, schema)?;
    let r = bind_operand(right, left, schema)?;
    let (lt, rt) = (ty_of(&l), ty_of(&r));
    if !comparable(lt, rt) {
        return Err(format!(
            "No matching signature for operator {op} for argument types: {}, {}",
            lt.name(),
            rt.name()
        ));
    }
    Ok((l, r))
}

fn bind(e: &Expr, schema: &Schema) -> Result<Bound, String> {
    let boolean = |b: Bound, what: &str| -> Result<Bound, String> {
        match ty_of(&b) {
            Ty::Bool | Ty::Null => Ok(b),
            other => Err(format!("No matching signature for operator {what} for argument types: {}", other.name())),
        }
    };
    Ok(match e {
        Expr::Column(path) => {
            let (path, ty) = resolve(schema, path)?;
            Bound::Column { path, ty }
        }
        Expr::Lit(l) => Bound::Const(literal(l, None)?),
        Expr::Cmp(a, op, b) => {
            let (l, r) = bind_comparison(a, b, schema, op.symbol())?;
            Bound::Cmp(Box::new(l), *op, Box::new(r))
        }
        Expr::And(a, b) => {
            Bound::And(Box::new(boolean(bind(a, schema)?, "AND")?), Box::new(boolean(bind(b, schema)?, "AND")?))
        }
        Expr::Or(a, b) => {
            Bound::Or(Box::new(boolean(bind(a, schema)?, "OR")?), Box::new(boolean(bind(b, schema)?, "OR")?))
        }
        Expr::Not(a) => Bound::Not(Box::new(boolean(bind(a, schema)?, "NOT")?)),
        Expr::In { expr, list, negated } => {
            let mut items = Vec::with_capacity(list.len());
            let mut bound_expr = None;
            for item in list {
                let (l, r) = bind_comparison(expr, item, schema, "IN")?;
                bound_expr.get_or_insert(l);
                items.push(r);
            }
            let expr = bound_expr.ok_or("IN needs at least one value")?;
            Bound::In { expr: Box::new(expr), list: items, negated: *negated }
        }
        Expr::Between { expr, low, high, negated } => {
            let (e1, lo) = bind_comparison(expr, low, schema, "BETWEEN")?;
            let (e2, hi) = bind_comparison(expr, high, schema, "BETWEEN")?;
            let range = Bound::And(
                Box::new(Bound::Cmp(Box::new(e1), CmpOp::Ge, Box::new(lo))),
                Box::new(Bound::Cmp(Box::new(e2), CmpOp::Le, Box::new(hi))),
            );
            if *negated { Bound::Not(Box::new(range)) } else { range }
        }
        Expr::IsNull { expr, negated } => Bound::IsNull { expr: Box::new(bind(expr, schema)?), negated: *negated },
        Expr::IsBool { expr, value, negated } => {
            Bound::IsBool { expr: Box::new(boolean(bind(expr, schema)?, "IS")?), value: *value, negated: *negated }
        }
    })
}

/// The value of column `path` (a struct path) at `row`; NULL when any level is NULL.
fn column_value<'a>(columns: &'a [ArrayRef], path: &[usize], ty: Ty, row: usize) -> Val<'a> {
    let mut array: &'a ArrayRef = &columns[path[0]];
    for &child in &path[1..] {
        if array.is_null(row) {
            return Val::Null;
        }
        array = array.as_struct().column(child);
    }
    if array.is_null(row) {
        return Val::Null;
    }
    match (ty, array.data_type()) {
        (Ty::Bool, _) => Val::Bool(array.as_boolean().value(row)),
        (Ty::Int, _) => Val::Int(array.as_primitive::<Int64Type>().value(row)),
        (Ty::Float, _) => Val::Float(array.as_primitive::<Float64Type>().value(row)),
        (Ty::Numeric, DataType::Decimal128(_, s)) => {
            let v = i256::from_i128(array.as_primitive::<Decimal128Type>().value(row));
            Val::Dec(v.wrapping_mul(pow10((38 - *s as i32).max(0) as u32)))
        }
        (Ty::BigNumeric, DataType::Decimal256(_, s)) => {
            let v = array.as_primitive::<Decimal256Type>().value(row);
            Val::Dec(v.wrapping_mul(pow10((38 - *s as i32).max(0) as u32)))
        }
        (Ty::Str, _) => Val::Str(array.as_string::<i32>().value(row)),
        (Ty::Bytes, _) => Val::Bytes(array.as_binary::<i32>().value(row)),
        (Ty::Date, _) => Val::Date(array.as_primitive::<Date32Type>().value(row)),
        (Ty::Time, _) => Val::Time(array.as_primitive::<Time64MicrosecondType>().value(row)),
        (Ty::Datetime, _) => Val::Datetime(array.as_primitive::<TimestampMicrosecondType>().value(row)),
        (Ty::Timestamp, _) => Val::Timestamp(array.as_primitive::<TimestampMicrosecondType>().value(row)),
        _ => Val::Null,
    }
}

fn to_dec(v: &Val) -> Option<i256> {
    match v {
        Val::Int(i) => Some(i256::from_i128(*i as i128).wrapping_mul(pow10(38))),
        Val::Dec(d) => Some(*d),
        _ => None,
    }
}

fn to_f64(v: &Val) -> Option<f64> {
    match v {
        Val::Int(i) => Some(*i as f64),
        Val::Float(f) => Some(*f),
        Val::Dec(d) => d.to_string().parse::<f64>().ok().map(|x| x / 1e38),
        _ => None,
    }
}

/// SQL comparison: `None` when either side is NULL (or NaN is involved).
fn compare(a: &Val, b: &Val) -> Option<Ordering> {
    match (a, b) {
        (Val::Null, _) | (_, Val::Null) => None,
        (Val::Int(x), Val::Int(y)) => Some(x.cmp(y)),
        (Val::Float(_), _) | (_, Val::Float(_)) => to_f64(a)?.partial_cmp(&to_f64(b)?),
        (Val::Int(_) | Val::Dec(_), Val::Int(_) | Val::Dec(_)) => Some(to_dec(a)?.cmp(&to_dec(b)?)),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        (Val::Str(x), Val::Str(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        (Val::Bytes(x), Val::Bytes(y)) => Some(x.cmp(y)),
        (Val::Date(x), Val::Date(y)) => Some(x.cmp(y)),
        (Val::Time(x), Val::Time(y))
        | (Val::Datetime(x), Val::Datetime(y))
        | (Val::Timestamp(x), Val::Timestamp(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn truth(v: Option<bool>) -> Val<'static> {
    v.map_or(Val::Null, Val::Bool)
}

fn as_bool(v: &Val) -> Option<bool> {
    match v {
        Val::Bool(b) => Some(*b),
        _ => None,
    }
}

fn eval<'a>(b: &'a Bound, columns: &'a [ArrayRef], row: usize) -> Val<'a> {
    match b {
        Bound::Column { path, ty } => column_value(columns, path, *ty, row),
        Bound::Const(c) => c.val(),
        Bound::Cmp(l, op, r) => {
            let ord = compare(&eval(l, columns, row), &eval(r, columns, row));
            truth(ord.map(|o| match op {
                CmpOp::Eq => o == Ordering::Equal,
                CmpOp::Ne => o != Ordering::Equal,
                CmpOp::Lt => o == Ordering::Less,
                CmpOp::Le => o != Ordering::Greater,
                CmpOp::Gt => o == Ordering::Greater,
                CmpOp::Ge => o != Ordering::Less,
            }))
        }
        Bound::And(l, r) => match (as_bool(&eval(l, columns, row)), as_bool(&eval(r, columns, row))) {
            (Some(false), _) | (_, Some(false)) => Val::Bool(false),
            (Some(true), Some(true)) => Val::Bool(true),
            _ => Val::Null,
        },
        Bound::Or(l, r) => match (as_bool(&eval(l, columns, row)), as_bool(&eval(r, columns, row))) {
            (Some(true), _) | (_, Some(true)) => Val::Bool(true),
            (Some(false), Some(false)) => Val::Bool(false),
            _ => Val::Null,
        },
        Bound::Not(e) => truth(as_bool(&eval(e, columns, row)).map(|b| !b)),
        Bound::In { expr, list, negated } => {
            let v = eval(expr, columns, row);
            let mut saw_null = matches!(v, Val::Null);
            let mut found = false;
            for item in list {
                match compare(&v, &eval(item, columns, row)) {
                    Some(Ordering::Equal) => {
                        found = true;
                        break;
                    }
                    Some(_) => {}
                    None => saw_null = true,
                }
            }
            let result = if found {
                Some(true)
            } else if saw_null {
                None
            } else {
                Some(false)
            };
            truth(result.map(|r| r != *negated))
        }
        Bound::IsNull { expr, negated } => Val::Bool(matches!(eval(expr, columns, row), Val::Null) != *negated),
        Bound::IsBool { expr, value, negated } => {
            Val::Bool((as_bool(&eval(expr, columns, row)) == Some(*value)) != *negated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::synthetic::{SyntheticOptions, SyntheticSource};

    fn batch() -> RecordBatch {
        SyntheticSource::new(SyntheticOptions::default()).batch(0, 3000)
    }

    fn count(filter: &str) -> usize {
        let b = batch();
        let f = Filter::bind(&parse_filter(filter).unwrap(), &b.schema()).unwrap();
        f.apply(&b).unwrap().num_rows()
    }

    fn error(filter: &str) -> String {
        let b = batch();
        match parse_filter(filter) {
            Err(e) => e,
            Ok(expr) => Filter::bind(&expr, &b.schema()).err().unwrap_or_default(),
        }
    }

    #[test]
    fn comparisons_and_logic() {
        assert_eq!(count("id < 100"), 100);
        assert_eq!(count("id >= 100 AND id < 150"), 50);
        assert_eq!(count("id < 10 OR id >= 2990"), 20);
        assert_eq!(count("NOT (id < 2990)"), 10);
        assert_eq!(count("id IN (1, 5, 7, 99999)"), 3);
        assert_eq!(count("id NOT IN (1, 5)"), 2998);
        assert_eq!(count("id BETWEEN 10 AND 19"), 10);
        assert_eq!(count("id NOT BETWEEN 10 AND 2999"), 10);
        assert_eq!(count("`id` = 7"), 1);
        assert_eq!(count("id != 7"), 2999);
        assert_eq!(count("id <> 7"), 2999);
        assert_eq!(count("id = 7 -- a comment"), 1);
    }

    #[test]
    fn three_valued_logic_with_nulls() {
        let nulls = count("int64_col IS NULL");
        assert!(nulls > 0);
        assert_eq!(count("int64_col IS NOT NULL"), 3000 - nulls);
        // NULL comparisons are never TRUE, neither is their negation.
        assert_eq!(count("int64_col = int64_col") + nulls, 3000);
        assert_eq!(count("NOT (int64_col = int64_col)"), 0);
        assert_eq!(count("int64_col IN (NULL)"), 0);
        assert_eq!(count("bool_col IS TRUE") + count("bool_col IS FALSE") + count("bool_col IS NULL"), 3000);
        assert_eq!(count("bool_col"), count("bool_col IS TRUE"));
    }

    #[test]
    fn typed_literals_and_coercion() {
        let by_literal = count("date_col >= DATE '2000-01-01'");
        assert!(by_literal > 0 && by_literal < 3000);
        assert_eq!(count("date_col >= '2000-01-01'"), by_literal);
        assert_eq!(count("date_col >= CAST('2000-1-1' AS DATE)"), by_literal);
        let ts = count("timestamp_col < TIMESTAMP '2015-06-01 12:00:00 UTC'");
        assert_eq!(count("timestamp_col < TIMESTAMP '2015-06-01T14:00:00+02:00'"), ts);
        assert_eq!(count("timestamp_col < '2015-06-01 12:00:00'"), ts);
        assert!(count("datetime_col > DATETIME '2020-01-01 00:00:00'") > 0);
        assert!(count("time_col < TIME '12:00:00'") > 0);
        let n = count("numeric_col > 1.5");
        assert!(n > 0);
        assert_eq!(count("numeric_col > NUMERIC '1.5'"), n);
        assert_eq!(count("numeric_col = 1.5"), count("numeric_col = 1.500"));
        assert!(count("bignumeric_col > 0") > 0);
        assert!(count("float64_col > 0.5") > 0);
        assert!(count("string_col = 'alpha'") > 0);
        assert_eq!(count("string_col IN ('alpha', 'NULL')"), count("string_col = 'alpha' OR string_col = 'NULL'"));
    }

    #[test]
    fn nested_paths() {
        let b = SyntheticSource::new(SyntheticOptions::default()).batch(0, 100);
        let f = Filter::bind(&parse_filter("record.a < 30").unwrap(), &b.schema()).unwrap();
        let n = f.apply(&b).unwrap().num_rows();
        assert!(n > 0 && n <= 10, "{n}");
    }

    #[test]
    fn refusals_are_messages() {
        assert!(error("id = 'x'").contains("No matching signature for operator = for argument types: INT64, STRING"));
        assert!(error("nope = 1").contains("Unrecognized name: nope"));
        assert!(error("LOWER(string_col) = 'a'").contains("Function not found"));
        assert!(error("id + 1 = 2").contains("Syntax error"));
        assert!(error("id = ").contains("end of expression"));
        assert!(error("date_col > DATE 'soon'").contains("DATE"));
        assert!(error("id").contains("BOOL"));
        assert!(error("'unterminated").contains("unterminated"));
        assert!(error("geography_col = 'POINT(1 1)'").contains("GEOGRAPHY"));
        assert!(error("record.zz = 1").contains("zz"));
    }

    #[test]
    fn queries() {
        match parse_query("SELECT id, record.a FROM `p.d.t` WHERE id < 3;").unwrap() {
            Statement::Select(s) => {
                assert_eq!(s.columns, ["id", "record.a"]);
                assert_eq!(s.table, ["p", "d", "t"]);
                assert!(s.filter.is_some());
            }
            other => panic!("{other:?}"),
        }
        match parse_query("select * from my-project.d.t").unwrap() {
            Statement::Select(s) => assert!(s.columns.is_empty() && s.table == ["my-project", "d", "t"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_query("SELECT 1; SELECT 2").unwrap(), Statement::Script { statements: 2 });
        assert!(parse_query("UPDATE t SET a = 1").is_err());
        assert!(parse_query("SELECT * FROM t").unwrap_err().contains("missing dataset"));
    }

    #[test]
    fn literal_parsers() {
        assert_eq!(parse_decimal("1.5"), Some(i256::from_i128(15).wrapping_mul(pow10(37))));
        assert_eq!(parse_decimal("-0.000000001"), Some(i256::from_i128(-1).wrapping_mul(pow10(29))));
        assert_eq!(parse_decimal("abc"), None);
        assert_eq!(parse_date("1970-01-02"), Some(1));
        assert_eq!(parse_time("00:00:01.5"), Some(1_500_000));
        assert_eq!(parse_timestamp("1970-01-01 01:00:00+01:00"), Some(0));
        assert_eq!(parse_timestamp("1970-01-01T00:00:01Z"), Some(1_000_000));
    }
}
