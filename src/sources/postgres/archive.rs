//! pg_dump's custom archive format, as far as restores need it. pg_dump writing to a pipe —
//! which is how lifeboat streams it — cannot go back and record where each table's data
//! starts. Two ways around that live here:
//! - `toc_only` copies the header and table of contents alone: an archive with no data that
//!   `pg_restore --section=post-data --jobs N` reads to build indexes and constraints in
//!   parallel, while the data itself was streamed into a sequential pg_restore.
//! - `fill_data_offsets` scans a fully staged archive once and fills the offsets in, exactly
//!   where pg_dump itself would have written them, so `pg_restore --jobs N` seeks straight to
//!   each table's data instead of scanning the file for every table.
//!
//! - `share_data` copies a decoded stream with only the tables this copy claimed filled in,
//!   so several pg_restore processes, each fed its own decode of the staged (compressed)
//!   archive, load its tables in parallel.
//!
//! Anything unexpected leaves the caller to fall back: pg_restore still reads the archive,
//! only slower.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

const fn version(major: u32, minor: u32) -> u32 {
    (major << 16) | (minor << 8)
}

const FORMAT_CUSTOM: u8 = 1;
const BLOCK_DATA: u8 = 1;
const BLOCK_LARGE_OBJECTS: u8 = 3;
const OFFSET_NOT_SET: u8 = 1;
const OFFSET_SET: u8 = 2;

/// Where the archive's bytes come from: a staged file, skipped over by seeking, or a stream
/// being copied, skipped over by reading (and so copying) the bytes.
trait Input: Read {
    fn skip(&mut self, bytes: u64) -> io::Result<()>;
}

impl Input for BufReader<File> {
    fn skip(&mut self, bytes: u64) -> io::Result<()> {
        self.seek_relative(bytes as i64)
    }
}

/// Reads `inner`, writing every byte read to `copy`.
struct Copying<R, W> {
    inner: R,
    copy: W,
}

impl<R: Read, W: Write> Read for Copying<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

impl<R: Read, W: Write> Input for Copying<R, W> {
    fn skip(&mut self, bytes: u64) -> io::Result<()> {
        let skipped = io::copy(&mut self.take(bytes), &mut io::sink())?;
        if skipped < bytes {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

struct Reader<I> {
    inner: I,
    position: u64,
    version: u32,
    int_size: usize,
}

/// pg_dump's integer: a sign byte, then `int_size` (at most 8) little-endian bytes.
const MAX_INT_BYTES: usize = 9;

fn decode_int(encoded: &[u8]) -> i64 {
    let magnitude = encoded[1..]
        .iter()
        .rev()
        .fold(0i64, |value, byte| (value << 8) | *byte as i64);
    if encoded[0] != 0 {
        -magnitude
    } else {
        magnitude
    }
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl<I: Input> Reader<I> {
    fn byte(&mut self) -> io::Result<u8> {
        let mut byte = [0u8];
        self.inner.read_exact(&mut byte)?;
        self.position += 1;
        Ok(byte[0])
    }

    fn int(&mut self) -> io::Result<i64> {
        let mut bytes = [0u8; MAX_INT_BYTES];
        let encoded = &mut bytes[..1 + self.int_size];
        self.inner.read_exact(encoded)?;
        self.position += encoded.len() as u64;
        Ok(decode_int(encoded))
    }

    /// A length-prefixed string; a negative length is NULL.
    fn skip_string(&mut self) -> io::Result<bool> {
        let length = self.int()?;
        if length < 0 {
            return Ok(false);
        }
        self.skip(length as u64)?;
        Ok(true)
    }

    fn skip(&mut self, bytes: u64) -> io::Result<()> {
        self.inner.skip(bytes)?;
        self.position += bytes;
        Ok(())
    }

    /// A length-prefixed string, None for NULL; refused past `MAX_TEXT` bytes.
    fn string(&mut self) -> io::Result<Option<String>> {
        let length = self.int()?;
        if length < 0 {
            return Ok(None);
        }
        if length as u64 > MAX_TEXT {
            return Err(corrupt("implausibly long string in the table of contents"));
        }
        let mut bytes = vec![0u8; length as usize];
        self.inner.read_exact(&mut bytes)?;
        self.position += length as u64;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }

    fn new(inner: I) -> Reader<I> {
        Reader {
            inner,
            position: 0,
            version: 0,
            int_size: 4,
        }
    }
}

/// Where one TOC entry's offset field is, for the entry with this dump id.
struct OffsetField {
    dump_id: i64,
    position: u64,
}

/// Fills in the data offsets of a staged custom-format archive. Returns how many entries
/// were filled in (0 when pg_dump had already written them, or the file is not one lifeboat
/// understands).
pub fn fill_data_offsets(path: &Path) -> io::Result<usize> {
    let (fields, offset_size, blocks) = {
        let mut reader = Reader::new(BufReader::with_capacity(64 * 1024, File::open(path)?));
        let Some(offset_size) = read_header(&mut reader)? else {
            return Ok(0);
        };
        let fields = read_toc(&mut reader, offset_size)?;
        if fields.is_empty() {
            return Ok(0);
        }
        let blocks = scan_data_blocks(&mut reader)?;
        (fields, offset_size, blocks)
    };

    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut filled = 0;
    for field in &fields {
        let Some((_, block)) = blocks.iter().find(|(id, _)| *id == field.dump_id) else {
            continue;
        };
        let mut encoded = vec![OFFSET_SET];
        encoded.extend((0..offset_size).map(|i| (block >> (8 * i)) as u8));
        file.seek(SeekFrom::Start(field.position))?;
        file.write_all(&encoded)?;
        filled += 1;
    }
    // No fsync: the staged file is scratch, read back at once from the page cache.
    Ok(filled)
}

/// Copies the header and table of contents of the archive `input` to `out`, stopping where
/// the data begins. Returns false, having copied only part of it, when `input` is not a
/// custom-format archive this code knows.
pub fn toc_only(input: impl Read, out: impl Write) -> io::Result<bool> {
    let mut reader = Reader::new(Copying {
        inner: io::BufReader::with_capacity(64 * 1024, input),
        copy: io::BufWriter::new(out),
    });
    let Some(offset_size) = read_header(&mut reader)? else {
        return Ok(false);
    };
    read_toc(&mut reader, offset_size)?;
    reader.inner.copy.flush()?;
    Ok(true)
}

/// Checks the header and returns the archive's offset size, or None for an archive that is
/// not a custom-format one this code knows.
fn read_header(reader: &mut Reader<impl Input>) -> io::Result<Option<usize>> {
    let mut magic = [0u8; 5];
    reader.inner.read_exact(&mut magic)?;
    reader.position += 5;
    if &magic != b"PGDMP" {
        return Ok(None);
    }
    let (major, minor, _revision) = (reader.byte()?, reader.byte()?, reader.byte()?);
    reader.version = version(major as u32, minor as u32);
    // 1.12 (PostgreSQL 9.5) to 1.16 (PostgreSQL 17/18): the versions whose layout is known here.
    if reader.version < version(1, 12) || reader.version > version(1, 16) {
        return Ok(None);
    }
    reader.int_size = reader.byte()? as usize;
    let offset_size = reader.byte()? as usize;
    if !(1..=8).contains(&reader.int_size) || !(1..=8).contains(&offset_size) {
        return Err(corrupt("implausible integer sizes in the archive header"));
    }
    if reader.byte()? != FORMAT_CUSTOM {
        return Ok(None);
    }
    if reader.version >= version(1, 15) {
        reader.byte()?; // compression algorithm
    } else {
        reader.int()?; // compression level
    }
    for _ in 0..7 {
        reader.int()?; // creation time: sec, min, hour, mday, mon, year, isdst
    }
    reader.skip_string()?; // database name
    reader.skip_string()?; // server version
    reader.skip_string()?; // pg_dump version
    Ok(Some(offset_size))
}

/// Reads the TOC and returns the offset fields that pg_dump left unset.
fn read_toc(reader: &mut Reader<impl Input>, offset_size: usize) -> io::Result<Vec<OffsetField>> {
    let count = reader.int()?;
    if count < 0 {
        return Err(corrupt("negative TOC entry count"));
    }
    let mut fields = Vec::new();
    for _ in 0..count {
        let dump_id = reader.int()?;
        reader.int()?; // had dumper
        reader.skip_string()?; // table oid
        reader.skip_string()?; // oid
        reader.skip_string()?; // tag
        reader.skip_string()?; // desc
        reader.int()?; // section
        for _ in 0..6 {
            reader.skip_string()?; // defn, drop, copy, namespace, tablespace, table access method
        }
        if reader.version >= version(1, 16) {
            reader.int()?; // relkind
        }
        reader.skip_string()?; // owner
        reader.skip_string()?; // "with oids", always "false"
        while reader.skip_string()? {} // dependencies, ended by NULL
        let position = reader.position;
        let state = reader.byte()?;
        reader.skip(offset_size as u64)?;
        if state == OFFSET_NOT_SET {
            fields.push(OffsetField { dump_id, position });
        }
    }
    Ok(fields)
}

/// The longest TOC string `roles_named` reads: a function body or a view can be long, never
/// this long.
const MAX_TEXT: u64 = 256 * 1024 * 1024;

/// The roles a dump's objects need on the server it is restored into.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RolesNamed {
    /// Owners of objects (pg_restore sets them unless `--no-owner`).
    pub owners: std::collections::BTreeSet<String>,
    /// Roles privileges are granted to, revoked from, or granted by (unless `--no-acl`).
    pub grantees: std::collections::BTreeSet<String>,
    /// Roles that row security policies apply to and user mappings are for: needed
    /// whatever pg_restore is told.
    pub others: std::collections::BTreeSet<String>,
}

/// What `for_each_entry` reads of a table of contents entry.
struct TocEntry {
    tag: String,
    desc: String,
    defn: String,
    owner: Option<String>,
}

/// Calls `each` with every entry of the table of contents of the custom-format archive
/// `input`; false when `input` is not an archive this code knows.
fn for_each_entry(input: impl Read, mut each: impl FnMut(TocEntry)) -> io::Result<bool> {
    let mut reader = Reader::new(Copying {
        inner: io::BufReader::with_capacity(64 * 1024, input),
        copy: io::sink(),
    });
    let Some(offset_size) = read_header(&mut reader)? else {
        return Ok(false);
    };
    let count = reader.int()?;
    if count < 0 {
        return Err(corrupt("negative TOC entry count"));
    }
    for _ in 0..count {
        reader.int()?; // dump id
        reader.int()?; // had dumper
        reader.skip_string()?; // table oid
        reader.skip_string()?; // oid
        let tag = reader.string()?.unwrap_or_default();
        let desc = reader.string()?.unwrap_or_default();
        reader.int()?; // section
        let defn = reader.string()?.unwrap_or_default();
        for _ in 0..5 {
            reader.skip_string()?; // drop, copy, namespace, tablespace, table access method
        }
        if reader.version >= version(1, 16) {
            reader.int()?; // relkind
        }
        let owner = reader.string()?.filter(|o| !o.is_empty());
        reader.skip_string()?; // "with oids"
        while reader.skip_string()? {} // dependencies, ended by NULL
        reader.byte()?; // offset state
        reader.skip(offset_size as u64)?;
        each(TocEntry {
            tag,
            desc,
            defn,
            owner,
        });
    }
    Ok(true)
}

/// The roles the objects of the archive `input` name, read from its table of contents
/// alone. None when `input` is not a custom-format archive this code knows. The database's
/// own entries (its owner, `GRANT CONNECT ON DATABASE`) are left out: see `DatabaseEntries`.
pub fn roles_named(input: impl Read) -> io::Result<Option<RolesNamed>> {
    let mut roles = RolesNamed::default();
    let known = for_each_entry(input, |entry| {
        let of_the_database = entry.desc == "DATABASE"
            || entry.desc == "DATABASE PROPERTIES"
            || (entry.desc == "ACL" && entry.tag.starts_with("DATABASE "));
        if of_the_database {
            return;
        }
        if let Some(owner) = entry.owner {
            roles.owners.insert(owner);
        }
        match entry.desc.as_str() {
            "ACL" | "DEFAULT ACL" => roles.grantees.extend(roles_in_sql(&entry.defn)),
            "POLICY" | "USER MAPPING" => roles.others.extend(roles_in_sql(&entry.defn)),
            _ => {}
        }
    })?;
    Ok(known.then_some(roles))
}

/// The entries of a dump that describe the database itself rather than what it holds:
/// how it is created (encoding, locale provider, collation, tablespace), its owner, its
/// settings (`ALTER DATABASE … SET`, `ALTER ROLE … IN DATABASE`, connection limit), its
/// comment and its privileges. pg_dump always writes them; pg_restore uses them only with
/// `--create`, which cannot restore under another name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DatabaseEntries {
    /// The `CREATE DATABASE` statement, naming the database as it was dumped.
    pub create: Option<String>,
    pub owner: Option<String>,
    /// Everything else, as pg_dump wrote it: statements separated by semicolons.
    pub properties: Vec<String>,
    /// The privileges: `REVOKE` and `GRANT … ON DATABASE`.
    pub privileges: Vec<String>,
}

/// The database's own entries of the custom-format archive `input` (see `DatabaseEntries`),
/// read from its table of contents alone. None when `input` is not an archive this code knows.
pub fn database_entries(input: impl Read) -> io::Result<Option<DatabaseEntries>> {
    let mut entries = DatabaseEntries::default();
    let known = for_each_entry(input, |entry| {
        let of_the_database = entry.tag.starts_with("DATABASE ");
        match entry.desc.as_str() {
            "DATABASE" => {
                entries.create = Some(entry.defn);
                entries.owner = entry.owner;
            }
            "DATABASE PROPERTIES" => entries.properties.push(entry.defn),
            "COMMENT" | "SECURITY LABEL" if of_the_database => entries.properties.push(entry.defn),
            "ACL" if of_the_database => entries.privileges.push(entry.defn),
            _ => {}
        }
    })?;
    Ok(known.then_some(entries))
}

/// The statements of `sql` (as pg_dump writes a database's entries) that act on the
/// database `from`, rewritten to act on `to`: the identifier after the first `DATABASE`
/// keyword of each. psql meta-commands (`\connect`) are left out. A statement that names
/// no database, or another one, comes back as an `Err`: it is never run, since on the
/// server being restored into it could act on another database (the live one beside the
/// copy being loaded).
pub fn database_statements(sql: &str, from: &str, to: &str) -> Vec<Result<String, String>> {
    let sql: String = sql
        .split_inclusive('\n')
        .filter(|line| !line.trim_start().starts_with('\\'))
        .collect();
    let chars: Vec<char> = sql.chars().collect();
    let tokens = spanned_tokens(&chars);
    let mut statements = Vec::new();
    for statement in tokens.split(|(token, _)| *token == Token::Semicolon) {
        let (Some((_, first)), Some((_, last))) = (statement.first(), statement.last()) else {
            continue;
        };
        let text = |range: std::ops::Range<usize>| chars[range].iter().collect::<String>();
        let whole = text(first.start..last.end);
        let matches = |name: &Token| match name {
            Token::Quoted(name) => name == from,
            // pg_dump leaves a name unquoted only when it is lower case already.
            Token::Word(name) => name == from,
            _ => false,
        };
        // The first `DATABASE name`: a role called "database" may come before it.
        let named = statement.windows(2).find_map(|pair| match pair {
            [(Token::Word(keyword), _), (name, span)] if keyword == "database" && matches(name) => {
                Some(span.clone())
            }
            _ => None,
        });
        statements.push(match named {
            Some(span) => Ok(format!(
                "{}{}{}",
                text(first.start..span.start),
                super::quote_identifier(to),
                text(span.end..last.end)
            )),
            _ => Err(whole),
        });
    }
    statements
}

/// The roles that privilege statements (`GRANT`, `REVOKE`) written by pg_dump name.
pub fn roles_of_sql(sql: &str) -> Vec<String> {
    roles_in_sql(sql)
}

/// A token of SQL as pg_dump writes it.
#[derive(Debug, PartialEq)]
enum Token {
    /// An unquoted word (a keyword or an identifier, folded to lower case).
    Word(String),
    /// A double-quoted identifier, unquoted.
    Quoted(String),
    /// A string constant, a number's remains, or punctuation but the ones below.
    Other,
    Comma,
    Semicolon,
    Open,
    Close,
}

fn tokens(sql: &str) -> Vec<Token> {
    spanned_tokens(&sql.chars().collect::<Vec<_>>())
        .into_iter()
        .map(|(token, _)| token)
        .collect()
}

/// The tokens of `chars`, each with the range of `chars` it was read from.
fn spanned_tokens(chars: &[char]) -> Vec<(Token, std::ops::Range<usize>)> {
    let mut tokens = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        let start = at;
        let mut push = |token: Token, end: usize| tokens.push((token, start..end.min(chars.len())));
        let c = chars[at];
        match c {
            c if c.is_whitespace() => at += 1,
            '-' if chars.get(at + 1) == Some(&'-') => {
                while at < chars.len() && chars[at] != '\n' {
                    at += 1;
                }
            }
            '/' if chars.get(at + 1) == Some(&'*') => {
                at += 2;
                while at < chars.len() && !(chars[at] == '*' && chars.get(at + 1) == Some(&'/')) {
                    at += 1;
                }
                at += 2;
            }
            '"' | '\'' => {
                let mut text = String::new();
                at += 1;
                while at < chars.len() {
                    if chars[at] == c {
                        if chars.get(at + 1) == Some(&c) {
                            text.push(c);
                            at += 2;
                            continue;
                        }
                        break;
                    }
                    text.push(chars[at]);
                    at += 1;
                }
                at += 1;
                push(
                    if c == '"' {
                        Token::Quoted(text)
                    } else {
                        Token::Other
                    },
                    at,
                );
            }
            '$' => {
                // A dollar-quoted string: $tag$ ... $tag$.
                let tag_end = chars[at + 1..]
                    .iter()
                    .position(|c| !(c.is_alphanumeric() || *c == '_'))
                    .map(|p| at + 1 + p);
                match tag_end {
                    Some(end) if chars[end] == '$' => {
                        let tag: String = chars[at..=end].iter().collect();
                        let rest: String = chars[end + 1..].iter().collect();
                        let skipped = rest.find(&tag).map_or(rest.len(), |p| p + tag.len());
                        at = end + 1 + rest[..skipped].chars().count();
                    }
                    _ => at += 1,
                }
                push(Token::Other, at);
            }
            ',' => {
                at += 1;
                push(Token::Comma, at);
            }
            ';' => {
                at += 1;
                push(Token::Semicolon, at);
            }
            '(' => {
                at += 1;
                push(Token::Open, at);
            }
            ')' => {
                at += 1;
                push(Token::Close, at);
            }
            c if c.is_alphanumeric() || c == '_' => {
                while at < chars.len()
                    && (chars[at].is_alphanumeric() || chars[at] == '_' || chars[at] == '$')
                {
                    at += 1;
                }
                let word: String = chars[start..at].iter().collect();
                push(Token::Word(word.to_lowercase()), at);
            }
            _ => {
                at += 1;
                push(Token::Other, at);
            }
        }
    }
    tokens
}

/// Words that stand where a role may, and are none.
const NOT_ROLES: [&str; 5] = [
    "public",
    "current_user",
    "current_role",
    "session_user",
    "user",
];

/// The roles listed from `tokens[at]` on: names separated by commas.
fn role_list(tokens: &[Token], mut at: usize, roles: &mut Vec<String>) {
    loop {
        match tokens.get(at) {
            Some(Token::Quoted(name)) => roles.push(name.clone()),
            Some(Token::Word(word)) if !NOT_ROLES.contains(&word.as_str()) => {
                roles.push(word.clone())
            }
            Some(Token::Word(_)) => {}
            _ => return,
        }
        if tokens.get(at + 1) != Some(&Token::Comma) {
            return;
        }
        at += 2;
    }
}

/// Where the keyword `word` first stands in `tokens`, outside parentheses.
fn keyword(tokens: &[Token], word: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (at, token) in tokens.iter().enumerate() {
        match token {
            Token::Open => depth += 1,
            Token::Close => depth = depth.saturating_sub(1),
            Token::Word(w) if depth == 0 && w == word => return Some(at),
            _ => {}
        }
    }
    None
}

/// The roles that the statements pg_dump writes for privileges, default privileges, row
/// security policies and user mappings name.
fn roles_in_sql(sql: &str) -> Vec<String> {
    let tokens = tokens(sql);
    let mut roles = Vec::new();
    for statement in tokens.split(|t| *t == Token::Semicolon) {
        statement_roles(statement, &mut roles);
    }
    roles
}

fn statement_roles(statement: &[Token], roles: &mut Vec<String>) {
    let word = |at: usize| match statement.get(at) {
        Some(Token::Word(w)) => w.as_str(),
        _ => "",
    };
    match (word(0), word(1), word(2)) {
        ("grant", _, _) | ("revoke", _, _) => {
            let list = if word(0) == "grant" { "to" } else { "from" };
            if let Some(at) = keyword(statement, list) {
                role_list(statement, at + 1, roles);
            }
            if let Some(at) = keyword(statement, "granted") {
                role_list(statement, at + 2, roles);
            }
        }
        ("alter", "default", "privileges") => {
            if word(3) == "for" {
                role_list(statement, 5, roles);
            }
            let inner = keyword(statement, "grant").or_else(|| keyword(statement, "revoke"));
            if let Some(at) = inner {
                statement_roles(&statement[at..], roles);
            }
        }
        ("create", "policy", _) => {
            if let Some(at) = keyword(statement, "to") {
                role_list(statement, at + 1, roles);
            }
        }
        ("create", "user", "mapping") if word(3) == "for" => role_list(statement, 4, roles),
        _ => {}
    }
}

/// The `ALTER ROLE name WITH … LOGIN …` lines of a `pg_dumpall --globals-only` script for
/// roles in `roles`, made `NOLOGIN`; and the roles changed, in script order.
pub fn without_login(
    script: &str,
    roles: &std::collections::BTreeSet<String>,
) -> (String, Vec<String>) {
    let mut changed = Vec::new();
    let text = script
        .split_inclusive('\n')
        .map(|line| {
            let Some((role, rest)) = line.strip_prefix("ALTER ROLE ").and_then(identifier) else {
                return line.to_string();
            };
            let Some(attributes) = rest.strip_prefix(" WITH ") else {
                return line.to_string();
            };
            if !roles.contains(&role) {
                return line.to_string();
            }
            let mut found = false;
            let attributes: Vec<String> = attributes
                .split(' ')
                .map(|word| match word.strip_prefix("LOGIN") {
                    Some(tail) if tail.is_empty() || tail.starts_with(';') => {
                        found = true;
                        format!("NOLOGIN{tail}")
                    }
                    _ => word.to_string(),
                })
                .collect();
            if !found {
                return line.to_string();
            }
            changed.push(role);
            let head = &line[..line.len() - rest.len()];
            format!("{head} WITH {}", attributes.join(" "))
        })
        .collect();
    (text, changed)
}

/// The roles a `pg_dumpall --globals-only` script creates (`CREATE ROLE name;`).
pub fn roles_created(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|line| line.strip_prefix("CREATE ROLE "))
        .filter_map(|rest| identifier(rest).map(|(role, _)| role))
        .collect()
}

/// A role name at the start of `text`, quoted or not, and what follows it.
fn identifier(text: &str) -> Option<(String, &str)> {
    let text = text.trim_start();
    if let Some(quoted) = text.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.char_indices();
        while let Some((at, c)) = chars.next() {
            if c == '"' {
                if quoted[at + 1..].starts_with('"') {
                    name.push('"');
                    chars.next();
                } else {
                    return Some((name, &quoted[at + 1..]));
                }
            } else {
                name.push(c);
            }
        }
        return None;
    }
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(text.len());
    (end > 0).then(|| (text[..end].to_string(), &text[end..]))
}

/// Walks the data blocks after the TOC: (dump id, position of the block).
fn scan_data_blocks(reader: &mut Reader<impl Input>) -> io::Result<Vec<(i64, u64)>> {
    let mut blocks = Vec::new();
    loop {
        let position = reader.position;
        let kind = match reader.byte() {
            Ok(kind) => kind,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(blocks),
            Err(e) => return Err(e),
        };
        let dump_id = reader.int()?;
        match kind {
            BLOCK_DATA => skip_chunks(reader)?,
            BLOCK_LARGE_OBJECTS => {
                while reader.int()? != 0 {
                    skip_chunks(reader)?;
                }
            }
            _ => return Err(corrupt("unknown data block type")),
        }
        blocks.push((dump_id, position));
    }
}

fn skip_chunks(reader: &mut Reader<impl Input>) -> io::Result<()> {
    loop {
        let length = reader.int()?;
        if length == 0 {
            return Ok(());
        }
        if length < 0 {
            return Err(corrupt("negative data chunk length"));
        }
        reader.skip(length as u64)?;
    }
}

/// The data blocks of one archive, shared among the readers loading it: each block goes to
/// the first reader that reaches it. One reader failing calls it off for all of them.
#[derive(Debug, Default)]
pub struct SharedData {
    claimed: Mutex<HashSet<i64>>,
    abandoned: AtomicBool,
}

impl SharedData {
    fn claim(&self, dump_id: i64) -> io::Result<bool> {
        self.go_on()?;
        Ok(self.claimed.lock().expect("claims lock").insert(dump_id))
    }

    fn go_on(&self) -> io::Result<()> {
        match self.abandoned.load(Ordering::Relaxed) {
            true => Err(io::Error::other(
                "stopped because another pg_restore loading the same dump failed",
            )),
            false => Ok(()),
        }
    }

    /// Stops every reader at its next chunk; true for the first call only, whose cause is
    /// the one worth reporting.
    pub fn abandon(&self) -> bool {
        !self.abandoned.swap(true, Ordering::Relaxed)
    }
}

/// Copies the archive `input` to `out` with only the data blocks this copy claims from
/// `shared` filled in; every other block is kept, emptied. `pg_restore --section=data`
/// reading `out` loads the claimed tables and finds nothing to load in the rest, so readers
/// running side by side over the same archive load its tables in parallel, as
/// `pg_restore --jobs` does from a seekable file: a reader busy with a big table falls
/// behind, and the others claim the tables after it.
pub fn share_data(input: impl Read, out: impl Write, shared: &SharedData) -> io::Result<()> {
    let mut reader = Reader::new(Scanner::new(input, out));
    let Some(offset_size) = read_header(&mut reader)? else {
        return Err(corrupt(
            "not a pg_dump custom-format archive lifeboat knows",
        ));
    };
    read_toc(&mut reader, offset_size)?;
    let int_size = reader.int_size;
    let scanner = &mut reader.inner;
    while let Some(kind) = scanner.byte()? {
        let dump_id = scanner.int(int_size)?;
        let claimed = shared.claim(dump_id)?;
        scanner.keep(claimed)?;
        match kind {
            BLOCK_DATA => pass_chunks(scanner, int_size, shared)?,
            BLOCK_LARGE_OBJECTS => {
                while scanner.int(int_size)? != 0 {
                    pass_chunks(scanner, int_size, shared)?;
                }
            }
            _ => return Err(corrupt("unknown data block type")),
        }
        scanner.keep(true)?;
        if !claimed {
            // The end of the block, with nothing before it: a zero.
            scanner
                .out
                .write_all(&[0u8; MAX_INT_BYTES][..1 + int_size])?;
        }
    }
    scanner.flush()?;
    scanner.out.flush()
}

/// Passes a table's data: chunks, each a length and its bytes, ended by a zero length.
fn pass_chunks<R: Read, W: Write>(
    scanner: &mut Scanner<R, W>,
    int_size: usize,
    shared: &SharedData,
) -> io::Result<()> {
    loop {
        let length = scanner.int(int_size)?;
        if length == 0 {
            return Ok(());
        }
        if length < 0 {
            return Err(corrupt("negative data chunk length"));
        }
        scanner.pass(length as u64)?;
        shared.go_on()?;
    }
}

const SCAN_BUFFER: usize = 1024 * 1024;

/// A decoded archive read through one buffer; what is consumed from it is either written to
/// `out` or dropped. pg_dump writes a chunk per row, so a table is millions of small chunks:
/// they are walked inside the buffer and written out a buffer at a time.
struct Scanner<R, W> {
    input: R,
    out: W,
    buffer: Vec<u8>,
    /// `buffer[written..start]` is consumed and not yet written out.
    written: usize,
    start: usize,
    end: usize,
    keeping: bool,
}

impl<R: Read, W: Write> Scanner<R, W> {
    fn new(input: R, out: W) -> Scanner<R, W> {
        Scanner {
            input,
            out,
            buffer: vec![0; SCAN_BUFFER],
            written: 0,
            start: 0,
            end: 0,
            keeping: true,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.keeping && self.written < self.start {
            self.out.write_all(&self.buffer[self.written..self.start])?;
        }
        self.written = self.start;
        Ok(())
    }

    /// From here on, write what is consumed (true) or drop it.
    fn keep(&mut self, keeping: bool) -> io::Result<()> {
        self.flush()?;
        self.keeping = keeping;
        Ok(())
    }

    /// At least `n` unconsumed bytes in the buffer; false at the end of the input with none.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        if self.end - self.start >= n {
            return Ok(true);
        }
        self.flush()?;
        self.buffer.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        (self.start, self.written) = (0, 0);
        while self.end < n {
            match self.input.read(&mut self.buffer[self.end..]) {
                Ok(0) if self.end == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(read) => self.end += read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Consumes `n` bytes, however many buffers they span.
    fn pass(&mut self, mut n: u64) -> io::Result<()> {
        loop {
            let here = n.min((self.end - self.start) as u64) as usize;
            self.start += here;
            if !self.keeping {
                self.written = self.start;
            }
            n -= here as u64;
            if n == 0 {
                return Ok(());
            }
            if !self.fill(1)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The next byte; None at the end of the input.
    fn byte(&mut self) -> io::Result<Option<u8>> {
        if !self.fill(1)? {
            return Ok(None);
        }
        let byte = self.buffer[self.start];
        self.pass(1)?;
        Ok(Some(byte))
    }

    fn int(&mut self, int_size: usize) -> io::Result<i64> {
        if !self.fill(1 + int_size)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let value = decode_int(&self.buffer[self.start..self.start + 1 + int_size]);
        self.pass(1 + int_size as u64)?;
        Ok(value)
    }
}

/// The header and table of contents are read through the scanner too, and kept.
impl<R: Read, W: Write> Read for Scanner<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.fill(1)? {
            return Ok(0);
        }
        let n = buf.len().min(self.end - self.start);
        buf[..n].copy_from_slice(&self.buffer[self.start..self.start + n]);
        self.pass(n as u64)?;
        Ok(n)
    }
}

impl<R: Read, W: Write> Input for Scanner<R, W> {
    fn skip(&mut self, bytes: u64) -> io::Result<()> {
        self.pass(bytes)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn roles_without_passwords_lose_login() {
        let script = "CREATE ROLE app;\nALTER ROLE app WITH NOSUPERUSER INHERIT LOGIN NOREPLICATION;\n\
                      ALTER ROLE \"LOGIN x\" WITH NOSUPERUSER LOGIN;\n\
                      ALTER ROLE kept WITH LOGIN NOBYPASSRLS;\nALTER ROLE nologin WITH NOLOGIN;\n";
        let roles = ["app", "LOGIN x", "nologin"]
            .iter()
            .map(|r| r.to_string())
            .collect();
        let (text, changed) = super::without_login(script, &roles);
        assert_eq!(changed, vec!["app".to_string(), "LOGIN x".to_string()]);
        assert_eq!(
            text,
            "CREATE ROLE app;\nALTER ROLE app WITH NOSUPERUSER INHERIT NOLOGIN NOREPLICATION;\n\
             ALTER ROLE \"LOGIN x\" WITH NOSUPERUSER NOLOGIN;\n\
             ALTER ROLE kept WITH LOGIN NOBYPASSRLS;\nALTER ROLE nologin WITH NOLOGIN;\n"
        );
    }

    #[test]
    fn database_statements_are_renamed_and_others_refused() {
        let sql = "CREATE DATABASE lat WITH TEMPLATE = template0 ENCODING = 'LATIN1';\n\\connect lat\n\
                   COMMENT ON DATABASE lat IS 'the DATABASE lat; comment';\n\
                   ALTER ROLE database IN DATABASE lat SET search_path TO 'x';\n\
                   GRANT CONNECT ON DATABASE lat TO reader;\n\
                   ALTER DATABASE \"Other\" SET work_mem TO '8MB';\n";
        let statements = super::database_statements(sql, "lat", "lat_new\"x");
        assert_eq!(
            statements,
            vec![
                Ok("CREATE DATABASE \"lat_new\"\"x\" WITH TEMPLATE = template0 ENCODING = 'LATIN1'".to_string()),
                Ok("COMMENT ON DATABASE \"lat_new\"\"x\" IS 'the DATABASE lat; comment'".to_string()),
                Ok("ALTER ROLE database IN DATABASE \"lat_new\"\"x\" SET search_path TO 'x'".to_string()),
                Ok("GRANT CONNECT ON DATABASE \"lat_new\"\"x\" TO reader".to_string()),
                Err("ALTER DATABASE \"Other\" SET work_mem TO '8MB'".to_string()),
            ]
        );
        let quoted = super::database_statements(
            "ALTER DATABASE \"My DB\" CONNECTION LIMIT = 7;",
            "My DB",
            "b",
        );
        assert_eq!(
            quoted,
            vec![Ok("ALTER DATABASE \"b\" CONNECTION LIMIT = 7".to_string())]
        );
    }

    use super::*;

    fn int(value: i64) -> Vec<u8> {
        let mut encoded = vec![(value < 0) as u8];
        encoded.extend_from_slice(&(value.unsigned_abs() as u32).to_le_bytes());
        encoded
    }

    fn string(text: &str) -> Vec<u8> {
        [int(text.len() as i64), text.as_bytes().to_vec()].concat()
    }

    /// A custom-format archive (format 1.14) with no TOC entries, then `blocks`.
    fn archive(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = b"PGDMP".to_vec();
        bytes.extend([1, 14, 0, 4, 8, FORMAT_CUSTOM]);
        bytes.extend(int(0)); // compression level
        for field in [0, 0, 0, 1, 0, 126, 0] {
            bytes.extend(int(field));
        }
        for text in ["app", "15.0", "15.0"] {
            bytes.extend(string(text));
        }
        bytes.extend(int(0)); // TOC entries
        for block in blocks {
            bytes.extend(block);
        }
        bytes
    }

    fn data_block(dump_id: i64, chunks: &[&[u8]]) -> Vec<u8> {
        let mut block = vec![BLOCK_DATA];
        block.extend(int(dump_id));
        for chunk in chunks {
            block.extend(int(chunk.len() as i64));
            block.extend(*chunk);
        }
        block.extend(int(0));
        block
    }

    #[test]
    fn roles_are_read_from_what_pg_dump_writes() {
        let sql = "REVOKE ALL ON SCHEMA public FROM PUBLIC;\nGRANT SELECT ON TABLE shop.\"to x\" TO app_reader;\nGRANT ALL ON TABLE shop.orders TO \"Odd to \"\"Name\"\"\" WITH GRANT OPTION;\nGRANT USAGE ON SCHEMA public TO PUBLIC;\nGRANT SELECT(\"to\") ON TABLE t TO \"public\" GRANTED BY boss;\n";
        assert_eq!(
            roles_in_sql(sql),
            ["app_reader", "Odd to \"Name\"", "public", "boss"]
        );
        let sql = "ALTER DEFAULT PRIVILEGES FOR ROLE app_owner IN SCHEMA shop GRANT SELECT ON TABLES TO app_reader;\n";
        assert_eq!(roles_in_sql(sql), ["app_owner", "app_reader"]);
        let sql = "CREATE POLICY p ON shop.orders AS PERMISSIVE FOR SELECT TO policy_role, \"Two\" USING ((status = 'to x'::text));\n";
        assert_eq!(roles_in_sql(sql), ["policy_role", "Two"]);
        let sql = "CREATE USER MAPPING FOR umrole SERVER srv OPTIONS (\n    \"user\" 'x'\n);\nCREATE USER MAPPING FOR PUBLIC SERVER srv;\n";
        assert_eq!(roles_in_sql(sql), ["umrole"]);
        assert_eq!(
            roles_created(
                "CREATE ROLE app_owner;\nALTER ROLE app_owner WITH LOGIN;\nCREATE ROLE \"Big\";\n"
            ),
            ["app_owner", "Big"]
        );
    }

    fn empty_block(kind: u8, dump_id: i64) -> Vec<u8> {
        [vec![kind], int(dump_id), int(0)].concat()
    }

    /// Hands out a few hundred bytes per read, so ints and chunks straddle every refill.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(333);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn each_table_is_loaded_by_the_reader_that_claims_it_and_found_empty_by_the_others() {
        let rows: Vec<Vec<u8>> = (0..300_000)
            .map(|row| format!("{row}\tx\n").into_bytes())
            .collect();
        let big = data_block(1, &rows.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let large_objects = {
            let mut block = vec![BLOCK_LARGE_OBJECTS];
            block.extend(int(3));
            block.extend(int(16400));
            block.extend(&data_block(0, &[b"lo"])[1 + 5..]);
            block.extend(int(0));
            block
        };
        let huge_chunk = vec![7u8; SCAN_BUFFER * 2 + 5];
        let blocks = [
            big.clone(),
            data_block(2, &[b"c3"]),
            large_objects.clone(),
            data_block(4, &[&huge_chunk]),
        ];
        let input = archive(&blocks);

        let shared = SharedData::default();
        assert!(shared.claim(2).unwrap(), "another reader took table 2");
        let mut first = Vec::new();
        share_data(Trickle(&input), &mut first, &shared).unwrap();
        let expected = archive(&[
            big,
            empty_block(BLOCK_DATA, 2),
            large_objects,
            blocks[3].clone(),
        ]);
        assert!(first == expected, "the first reader's copy differs");

        let mut second = Vec::new();
        share_data(&input[..], &mut second, &shared).unwrap();
        let emptied = archive(&[
            empty_block(BLOCK_DATA, 1),
            empty_block(BLOCK_DATA, 2),
            empty_block(BLOCK_LARGE_OBJECTS, 3),
            empty_block(BLOCK_DATA, 4),
        ]);
        assert!(second == emptied, "the second reader's copy differs");

        shared.abandon();
        let error = share_data(&input[..], io::sink(), &shared).unwrap_err();
        assert!(error.to_string().contains("another pg_restore"), "{error}");

        let cut = &input[..input.len() - 100];
        let error = share_data(cut, io::sink(), &SharedData::default()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
